"""Look inside a running cluster: what the control store knows right now.

    minray.state.tasks()    minray.state.objects()   minray.state.actors()
    minray.state.nodes()    minray.state.errors()    minray.state.jobs()

Each returns a list of dicts (one per row, with its key as ``id`` in hex).
From a shell: ``minray list tasks`` prints the same as a table.
"""
from minray.gcs.tables import TABLES, task_id_of_key
from minray.node_manager.lineage import describe_task_record

DEFAULT_LIMIT = 1000


def _default_client():
    try:
        from minray.api import _runtime_gcs_client
    except ImportError:
        _runtime_gcs_client = None
    client = _runtime_gcs_client() if _runtime_gcs_client else None
    if client is None:
        raise RuntimeError(
            "not connected to a cluster: call minray.init() first, or pass client=GcsClient(...)")
    return client


def rows(table, client=None, limit=DEFAULT_LIMIT, prefix=b""):
    """Rows of any control-store table as dicts with an ``id`` field."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; tables are {', '.join(TABLES)}")
    client = client or _default_client()
    out = []
    for key, value in client.scan(table, prefix=prefix, limit=limit):
        if table == "tasks":
            value = describe_task_record(value)
            key = task_id_of_key(key)
        row = {"id": key.hex()}
        row.update(value if isinstance(value, dict) else {"value": value})
        out.append(row)
    return out


def tasks(client=None, limit=DEFAULT_LIMIT):
    """Finished tasks (the control store's tasks table) and, when called in a
    connected driver or worker without `client`, those still pending or
    running on its node (the node manager logs a task when it ends).

    Finished tasks come oldest first, one row per run: a task run again
    (its results were lost and made again) has a row for each run."""
    return _with_live("tasks", client, limit)


def objects(client=None, limit=DEFAULT_LIMIT):
    """Objects in the store and put objects (the control store's objects
    table) and, without `client` in a connected process, every object its node
    manager holds right now, small task results included."""
    return _with_live("objects", client, limit)


def _with_live(table, client, limit):
    # Live rows first: with many finished tasks logged, the limit must not
    # cut off the ones still pending or running.
    live = _live(table) if client is None else []
    out = live[:limit]
    known = {row["id"] for row in out}
    out.extend(row for row in rows(table, client, limit) if row["id"] not in known)
    return out[:limit]


def _live(what):
    from minray.runtime import core
    runtime = core.current()
    if runtime is None:
        return []
    return runtime.request_info(what) or []


def actors(client=None, limit=DEFAULT_LIMIT):
    return rows("actors", client, limit)


def nodes(client=None, limit=DEFAULT_LIMIT):
    return rows("nodes", client, limit)


def errors(client=None, limit=DEFAULT_LIMIT):
    return rows("errors", client, limit)


def jobs(client=None, limit=DEFAULT_LIMIT):
    return rows("jobs", client, limit)


def format_table(records, max_width=40):
    """Render dict rows as an aligned text table (columns in first-seen order)."""
    if not records:
        return "(no rows)"
    columns = []
    for record in records:
        columns.extend(c for c in record if c not in columns)

    def cell(value):
        text = value.hex() if isinstance(value, bytes) else str(value)
        return text if len(text) <= max_width else text[:max_width - 1] + "…"

    cells = [[cell(r.get(c, "")) for c in columns] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)
