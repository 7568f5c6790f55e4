"""The runtime linked into every driver and worker (client of the node manager)."""
