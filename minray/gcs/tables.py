"""The control store's tables and how their values are encoded.

| table     | key                  | value                                            |
| --------- | -------------------- | ------------------------------------------------ |
| nodes     | node id              | address, resources, state, last heartbeat         |
| jobs      | job id               | driver pid/host, start and end time, state        |
| functions | function id          | exported code (cloudpickled) and its name         |
| actors    | actor id             | class, state, node, name, restarts                |
| tasks     | task id              | (state, end time, node id, spec): the lineage     |
| objects   | object id            | locations (node ids), size, owner task            |
| errors    | error id             | job, type, message, traceback, time               |
| events    | span id              | profiling spans: name, worker, start, end         |
| names     | namespace + name     | named actor id (the registry; one per name)       |

Every value starts with a one-byte format version so that the layout of a
table's values can change without misreading old entries.
"""
import pickle

TABLES = ("nodes", "jobs", "functions", "actors", "tasks", "objects", "errors",
          "events", "names")

VALUE_FORMAT = 1


_PREFIX = bytes([VALUE_FORMAT])


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
