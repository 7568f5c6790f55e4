"""The control store: sharded, durable (LMDB), authenticated, with pub/sub."""
from minray.gcs.client import ControlStoreError, GcsClient, Subscription
from minray.gcs.supervisor import GcsProcesses
from minray.gcs.tables import TABLES

__all__ = ["ControlStoreError", "GcsClient", "GcsProcesses", "Subscription", "TABLES"]
