"""The control store's tables and how their values are encoded.

| table     | key                  | value                                            |
| --------- | -------------------- | ------------------------------------------------ |
| nodes     | node id              | address, resources, state, last heartbeat         |
| jobs      | job id               | driver pid/host, start and end time, state        |
| functions | function id          | exported code (cloudpickled) and its name         |
| actors    | actor id             | class, state, node, name, restarts                |
| tasks     | end time + task id   | (state, end time, node id, spec): the lineage     |
| objects   | object id            | locations (node ids), size, owner task            |
| errors    | error id             | job, type, message, traceback, time               |
| events    | span id              | profiling spans: name, worker, start, end         |
| names     | namespace + name     | named actor id (the registry; one per name)       |

Every value starts with a one-byte format version so that the layout of a
table's values can change without misreading old entries.

A task record's key starts with its end time (microseconds, big-endian), then
the task id: records are written and trimmed (oldest first) in time order, so
each write transaction adds to the last pages of the table and deletes from
its first ones. Keyed by task id alone, a batch of records touched pages all
over the table: it cost the control store twice the CPU per task.
"""
import pickle

TABLES = ("nodes", "jobs", "functions", "actors", "tasks", "objects", "errors",
          "events", "names")

VALUE_FORMAT = 1


_PREFIX = bytes([VALUE_FORMAT])
TASK_KEY_TIME_BYTES = 8


def task_key(task_id, end_time):
    """The tasks table's key of a task that ended at end_time (time.time())."""
    return int(end_time * 1_000_000).to_bytes(TASK_KEY_TIME_BYTES, "big") + task_id


def task_id_of_key(key):
    return key[TASK_KEY_TIME_BYTES:]


def encode_value(value):
    return _PREFIX + pickle.dumps(value, protocol=5)


def decode_value(data):
    if data is None:
        return None
    if not data or data[0] != VALUE_FORMAT:
        raise ValueError(
            f"control store value has format {data[0] if data else None}, expected "
            f"{VALUE_FORMAT}: the cluster was written by another minray version")
    return pickle.loads(data[1:])
