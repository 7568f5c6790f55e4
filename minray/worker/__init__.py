"""Worker processes: run tasks dispatched by their node manager."""
