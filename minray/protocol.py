"""The messages minray processes exchange, by name and field.

A message is a tuple: its name (a short string), then its fields in the order
listed below. Frames carry plain data only (minray.wire refuses every pickled
class), so the named tuples here are made from a message's fields where it is
handled (`TaskSpec(*fields)`) and sent as plain tuples. PROTOCOL_VERSION is
exchanged in the handshake: a peer of another version is refused before any
message is read.
"""
from typing import NamedTuple

PROTOCOL_VERSION = 9

# How a value travels: inline (its bytes in messages), in the node's store,
# or an error (inline bytes of a pickled exception). ACTOR_HANDLES is no
# value: the directory entry (minray.ids.actor_handle_id) whose holders keep
# an actor alive, counted like any object's.
# LOCATED (between node managers only): the value is in the store of other
# nodes; its payload is (size, [addresses of nodes holding a copy]).
# SPILLED (in a node manager's directory only): written to a disk file to
# make room in the store (minray.node_manager.spilling).
INLINE, IN_STORE, ERROR, ACTOR_HANDLES, LOCATED, SPILLED = "v", "s", "e", "h", "l", "d"
# The stream of an "output" chunk (what a task printed).
STDOUT, STDERR = 1, 2
KIND_NAMES = {INLINE: "inline", IN_STORE: "store", ERROR: "error",
              ACTOR_HANDLES: "actor handles", LOCATED: "remote", SPILLED: "spilled",
              None: "pending"}


class TaskSpec(NamedTuple):
    """A task as its submitter describes it; logged as its lineage."""
    task_id: bytes
    function_id: bytes
    name: str
    args: list              # ("r", object_id) | ("v", metadata, bytes)
    kwarg_names: tuple
    num_returns: int
    resources: dict
    max_retries: int
    contained: list         # ids of refs serialized inside inline arguments
    max_calls: int          # its worker exits after running this many (0: never)
    parent_task_id: bytes   # the task (or driver) that submitted it


class ActorCallSpec(NamedTuple):
    """A call of an actor's method."""
    task_id: bytes
    actor_id: bytes
    method: str
    args: list
    kwarg_names: tuple
    num_returns: int
    contained: list


class Dispatch(NamedTuple):
    """Node manager -> worker: one task or actor call to run (in "tasks")."""
    task_id: bytes
    function_id: bytes      # None for an actor's method
    pickled: bytes          # the function's code, the first time a worker gets it
    name: str
    args: list              # ("v", metadata, bytes) | ("s", object_id, metadata)
    kwarg_names: tuple
    num_returns: int
    gpu_ids: list


class TaskResult(NamedTuple):
    """Worker -> node manager: a finished task or call (in "done")."""
    task_id: bytes
    results: list           # of ResultObject
    seconds: float
    error_text: str         # None unless it raised


class ResultObject(NamedTuple):
    """One return value of a finished task."""
    object_id: bytes
    kind: str               # INLINE, IN_STORE or ERROR
    meta: bytes
    payload: object         # bytes (inline, error) or the size in the store
    contained: list         # ids of refs serialized inside the value


# Client (driver or worker) -> node manager: name -> fields.
TO_NODE_MANAGER = {
    "hello": ("role", "info"),
    "fn": ("function_id", "pickled", "name"),
    "submit": ("spec",),                        # TaskSpec
    # A run of submissions sent together: [("submit", spec) | ("actor_call", spec)].
    "batch": ("messages",),
    "put": ("object_id", "kind", "meta", "payload", "contained"),
    "sub": ("object_ids",),                     # tell me when these are ready
    # Reference counting; an actor handle counts as a ref to its actor's
    # minray.ids.actor_handle_id.
    "borrow": ("object_ids",),                  # I hold refs I was handed
    "free": ("object_ids",),                    # I dropped my last ref to these
    "escape": ("object_ids",),                  # a ref left minray's serialization
    # A ref pickled on another node was loaded here: {object_id: that node's address}.
    "adopt": ("owners",),
    "done": ("results",),                       # [TaskResult]
    "blocked": ("not_started",),                # in get/wait: lend my CPU
    "unblocked": (),
    "giveback": ("task_ids",),                  # dispatched while I was blocked
    "info": ("request_id", "what"),
    "shutdown": (),                             # the embedded driver is done
    # Answered (unless request_id is 0) with None (created), a str (refused:
    # why) or (actor_id, class_name, methods) of the actor already holding
    # the name when the spec asks get_if_exists.
    "actor_create": ("spec", "request_id"),
    "actor_call": ("spec",),                    # ActorCallSpec
    "actor_ready": ("actor_id", "meta", "data", "error_text"),
    "actor_exit": (),
    "actor_kill": ("actor_id", "no_restart"),
    # Answered ("info", request_id, None), or with a str saying why it can't be.
    "cancel": ("request_id", "object_id", "force", "recursive"),
    # What a worker's tasks printed: [(job_id, label, stream, text)], label
    # the function's or actor class's name, stream 1 (stdout) or 2 (stderr).
    "output": ("chunks",),
    # The store has no room for `size` bytes: spill objects to disk to make
    # it. Answered ("info", request_id, whether there is room now).
    "make_room": ("request_id", "size"),
}

# Node manager -> node manager (accepted only on links of role "node";
# "sub", "borrow" and "free" above are also sent between nodes: a peer
# node waits for, borrows and frees objects as a local process does).
TO_NODE_MANAGER_FROM_PEERS = {
    "joined": ("info",),                        # head -> joining node: accepted
    "refused": ("reason",),                     # head -> joining node: not accepted, why
    "heartbeat": ("load",),                     # node -> head, every HEARTBEAT_INTERVAL_S
    "nodes": ("rows",),                         # head -> nodes: the cluster view
    # A value for an object the receiver waits for, owns or borrows; refs
    # inside it come as [(object_id, owner node address)].
    "value": ("object_id", "kind", "meta", "payload", "contained_owners"),
    # Run this task here; its results belong to the node at owner_address.
    # arg_owners: {object_id: owner node address} of its ref arguments and
    # of the refs inside its inline arguments.
    "run": ("spec", "arg_owners", "owner_address"),
    "finished": ("task_id", "state"),           # a task run for the receiver ended
    # Host an actor created on the sending node (which owns it), or run a
    # call of an actor hosted here or whose host the receiver knows.
    "create": ("spec", "arg_owners"),
    "call": ("spec", "arg_owners"),
    # Actor names, kept unique cluster-wide by the head: what is "claim"
    # (record: (actor_id, class_name, methods)), "lookup" or "release"
    # (record: the actor id). Answered (but "release") with "name_reply":
    # None (claimed / not found) or (record, address of the creating node).
    "name": ("number", "what", "key", "record"),
    "name_reply": ("number", "existing"),
    # Where does an actor the receiver owns live? Answered with "actor_host":
    # the hosting node's address (the receiver's own while it is not placed).
    "locate_actor": ("actor_id",),
    "actor_host": ("actor_id", "address"),
    # The copies of an object the receiver owns that it told the sender of
    # are gone (their nodes died): make it again if need be, and answer as
    # to "sub" (minray.node_manager.recovery).
    "lost": ("object_id", "addresses"),
    # Output for a job whose driver is the receiver's way: [(job_id, prefix,
    # stream, text)], prefix "label pid=N, ip=A", and the nodes it passed
    # (minray.node_manager.output).
    "forwarded_output": ("hops", "chunks"),
}
PEER_ONLY = frozenset(TO_NODE_MANAGER_FROM_PEERS)
TO_NODE_MANAGER.update(TO_NODE_MANAGER_FROM_PEERS)

# Node manager -> client: name -> fields.
TO_CLIENT = {
    "welcome": ("info",),
    "obj": ("object_id", "kind", "meta", "payload"),
    # Objects announced together: [(object_id, kind, meta, payload)], as "obj" each.
    "objs": ("objects",),
    "tasks": ("dispatches",),                   # [Dispatch]
    "actor_init": ("actor_id", "class_id", "pickled", "class_name", "args", "kwarg_names",
                   "gpu_ids", "max_concurrency", "is_async"),
    "error": ("text",),                         # printed by the client
    "info": ("request_id", "result"),
    "failed": ("request_id", "reason"),         # the request could not be handled
    "path": ("paths",),                         # directories for sys.path
    "cancel": ("task_id",),                     # stop this task (it answers in "done")
    "output": ("chunks",),                      # [(prefix, stream, text)]: print it
}

# Requests whose handler must answer even when it fails: name -> position of
# the request id among the fields.
REQUEST_ID_FIELD = {"info": 0, "actor_create": 1, "cancel": 0, "make_room": 0}


# What a "batch" may hold.
BATCHED = frozenset({"submit", "actor_call"})

# Name -> the length of a well-formed message, for a quick check per message.
NODE_MANAGER_MESSAGE_LENGTHS = {name: len(fields) + 1 for name, fields in TO_NODE_MANAGER.items()}


def bad_message(message, expected):
    """Why a message does not match the protocol, or None if it does."""
    if not isinstance(message, tuple) or not message or not isinstance(message[0], str):
        return f"not a named message: {type(message).__name__}"
    fields = expected.get(message[0])
    if fields is None:
        return f"unknown message {message[0]!r}"
    if len(message) - 1 != len(fields):
        return (f"message {message[0]!r} has {len(message) - 1} fields, "
                f"expected {len(fields)} ({', '.join(fields) or 'none'})")
    return None
