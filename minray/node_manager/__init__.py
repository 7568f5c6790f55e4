"""Node manager: local scheduler, object store owner, worker pool (one per node)."""
