"""The node manager's log to the control store: lineage, objects, errors.

The event loop must never wait for the control store: a stopped, dead or
restarting control store would otherwise stall every task on the node. So the
loop only appends entries to a bounded in-memory queue (`log_task`,
`log_object`, `log_error`, `log`); a background thread turns them into
records and writes them through a GcsClient. Appending takes no lock that a
network call holds. When the queue is full (the control store has been away
for a while), task, object and error entries are dropped and counted, with a
warning in the node manager's log at most every 10 s and a total once the
control store takes the log again; actor, function and
node records are coalesced instead (the newest value of each key is kept), so
the control store ends up with their current state once it is back.

What stays in the control store (docs/control-store.md, "What is kept"):

- tasks: one record per finished task (its spec, inline arguments included,
  and its end state). The table holds the newest `task_history` records
  (and at most `task_history_bytes` of them); older ones are deleted, oldest
  first, unless lineage may still need them: while any of the task's
  returns is held on this node, or while the kept record of a later task
  takes one of its returns as an argument, a record stays.
- objects: one record per put and per task result in the shared store; the
  newest `object_history`, and beyond that those of objects still held here.
- errors: the newest `error_history`.

error_info() must see an error as soon as the failed task's result reached
the driver, before the background thread wrote it: the newest errors are
also kept here in memory (`recent_errors`) for the node manager to answer.
"""
import collections
import logging
import os
import threading
import time

from minray import ids
from minray.gcs.tables import TASK_KEY_TIME_BYTES, encode_value, task_key
from minray.protocol import KIND_NAMES, ActorCallSpec, TaskSpec

log = logging.getLogger("minray.node_manager")

MAX_QUEUED = 20_000                  # entries waiting for the control store ...
MAX_QUEUED_BYTES = 64 << 20          # ... and the inline argument bytes they hold
CLIENT_BACKLOG = 2_000               # writes the client may buffer unsent
DRAIN_CHUNK = 1_000                  # records built and handed over at a time
GATHER_S = 0.05                      # let a burst of entries gather into big batches
TASK_HISTORY = 10_000                # task records kept beyond those lineage needs ...
TASK_HISTORY_BYTES = 32 << 20        # ... and their bytes (inline arguments can be big)
TASK_RECORD_BYTES = 200              # a record's size besides its inline arguments
OBJECT_HISTORY = 10_000              # records of objects no longer held, kept
ERROR_HISTORY = 10_000
RECENT_ERRORS = 1_000                # kept in memory for error_info()
WARN_INTERVAL_S = 10.0
CLOSE_TIMEOUT_S = 5.0
RETRY_MAX_S = 5.0
TRIM_CHECKS = 1_000                  # per drain, besides two per record written
NEEDED_STREAK = 100                  # needed records in a row that end a trimming pass
                                     # (or half the records written, if more)

# Entry kinds in the queue (the first item of each tuple).
_PUT, _TASK, _OBJECT, _ERROR = 0, 1, 2, 3
_KIND_NAMES = {_PUT: "record", _TASK: "task", _OBJECT: "object", _ERROR: "error"}
_FIRST_RETURN = ids.return_object_id(b"", 1)      # a task's first return: task id + this


def task_record(spec, state, when, node_id):
    """The tasks table's value for a finished task or actor call: (state, end
    time, node id, kind, spec fields).

    The spec holds the name, function or actor id, arguments, number of
    returns and resources; the record adds only what the spec lacks, as a
    tuple: names or ids said twice, or dict keys, would cost bytes (and
    pickling time) on every task. `kind` says which spec it is.
    """
    kind = "actor_call" if isinstance(spec, ActorCallSpec) else "task"
    return (state, when, node_id, kind, tuple(spec))


def describe_task_record(value):
    """A tasks-table value as the readable row minray.state shows."""
    if not isinstance(value, tuple) or len(value) != 5:
        return value
    state, when, node_id, kind, fields = value
    if kind == "actor_call":
        spec = ActorCallSpec(*fields)
        row = {"name": spec.method, "state": state, "actor_id": spec.actor_id.hex()}
    else:
        spec = TaskSpec(*fields)
        row = {"name": spec.name, "state": state, "function_id": spec.function_id.hex(),
               "resources": spec.resources}
    row.update(num_returns=spec.num_returns, node=node_id.hex(), time=when, spec=fields)
    return row


class LineageLog:
    """The node manager's writes to the control store, made off its event loop.

    is_held(object_id) tells whether the node still holds an object (it is
    called from the background thread; a dict membership test is safe there).
    """

    def __init__(self, node_id, is_held, max_queued=MAX_QUEUED,
                 max_queued_bytes=MAX_QUEUED_BYTES, task_history=TASK_HISTORY,
                 task_history_bytes=TASK_HISTORY_BYTES, object_history=OBJECT_HISTORY,
                 error_history=ERROR_HISTORY, gather_s=GATHER_S):
        self.node_id = node_id
        self.node_hex = node_id.hex()
        self._is_held = is_held
        self.max_queued = max_queued
        self.max_queued_bytes = max_queued_bytes
        self.task_history = task_history
        self.task_history_bytes = task_history_bytes
        self.object_history = object_history
        self.error_history = error_history
        self.gather_s = gather_s
        self.recent_errors = collections.deque(maxlen=RECENT_ERRORS)   # (key, record)
        # Shared by the loop (appends) and the writer thread (pops): deque and
        # dict operations are atomic, so neither side takes a lock.
        self._queue = collections.deque()
        self._coalesced = {}          # (table, key) -> value, written after the queue
        self._bytes_in = 0            # written by the loop only ...
        self._bytes_out = 0           # ... and by the writer only
        self._signalled = False
        self._wake = threading.Event()
        self._closing = False
        self._closed = threading.Event()
        # The loop's own counters.
        self.dropped = collections.Counter()
        self.dropped_total = 0
        self._dropped_since_warning = 0
        self._last_warning = 0.0
        # The writer's own state.
        self.written = 0
        self.deleted = 0
        self.gcs = None
        self._task_order = collections.deque()     # (key, number of returns, bytes)
        self._task_bytes = 0                        # of the records in _task_order
        self._object_order = collections.deque()
        self._error_order = collections.deque()
        self._pins = {}               # task id -> kept records taking its results
        self._pinned_by = {}          # task id -> producers its record pins
        self._last_error_log = 0.0
        self._reported_drops = 0
        self._thread = None

    # ------------------------------------------------------------ event loop side
    def start(self, connect):
        """Start the writer; it calls connect() (blocking) for its GcsClient."""
        if self._thread is not None:
            raise RuntimeError("the lineage log was started already")
        self._thread = threading.Thread(target=self._run, args=(connect,), daemon=True,
                                        name="minray-lineage")
        self._thread.start()

    def log(self, table, key, value):
        """A record whose newest value matters (actors, functions, nodes)."""
        coalesced = self._coalesced
        if (table, key) in coalesced or not self._fits(0):
            # Once a key is coalesced, its later values follow it there: the
            # queue is written first, so an older value must not be in it.
            coalesced[(table, key)] = value
            self._signal()
            return
        self._append((_PUT, table, key, value), 0)

    def function(self, function_id, name, pickled):
        self.log("functions", function_id, {"name": name, "pickled": pickled})

    def actor(self, actor_id, record):
        self.log("actors", actor_id, record)

    def error(self, kind, name, task_id, text):
        self.log_error({"type": kind, "function": name, "task_id": task_id.hex(),
                        "message": text, "time": time.time()})

    def log_task(self, spec, state):
        """A finished task or actor call (its spec is its lineage)."""
        # Once per task on the event loop: kept to a few operations.
        size = 0
        for arg in spec.args:
            if arg[0] == "v":
                size += len(arg[2])
        if (len(self._queue) < self.max_queued
                and self._bytes_in - self._bytes_out + size <= self.max_queued_bytes):
            self._bytes_in += size
            self._queue.append((_TASK, spec, state, time.time(), size))
            if not self._signalled:
                self._signalled = True
                self._wake.set()
        else:
            self._drop(_TASK)

    def log_object(self, object_id, entry, task_id):
        if entry is None:
            return
        if self._fits(0):
            self._append((_OBJECT, object_id, entry.kind, entry.size, task_id), 0)
        else:
            self._drop(_OBJECT)

    def log_error(self, record):
        """Record an error; it is in recent_errors before this returns."""
        key = os.urandom(8)
        record.setdefault("node", self.node_hex)
        self.recent_errors.append((key, record))
        if self._fits(0):
            self._append((_ERROR, key, record), 0)
        else:
            self._drop(_ERROR)

    def errors(self):
        """The newest errors as (key hex, record), oldest first."""
        return [(key.hex(), record) for key, record in self.recent_errors]

    def stats(self):
        return {"queued": len(self._queue) + len(self._coalesced),
                "dropped": dict((_KIND_NAMES[k], n) for k, n in self.dropped.items()),
                "written": self.written, "deleted": self.deleted,
                "connected": self.gcs is not None}

    def _fits(self, size):
        return (len(self._queue) < self.max_queued
                and self._bytes_in - self._bytes_out + size <= self.max_queued_bytes)

    def _append(self, item, size):
        if size:
            self._bytes_in += size
        self._queue.append(item)
        self._signal()

    def _signal(self):
        # The flag is cleared by the writer before it drains, so an append
        # that sees it set is drained by the pass that is about to run.
        if not self._signalled:
            self._signalled = True
            self._wake.set()

    def _drop(self, kind):
        self.dropped[kind] += 1
        self.dropped_total += 1
        self._dropped_since_warning += 1
        now = time.monotonic()
        if now - self._last_warning >= WARN_INTERVAL_S:
            log.warning("the control store is not keeping up (unreachable or stopped?): "
                        "dropped %d log entries since the last warning (%s in all); tasks "
                        "go on, their records are lost", self._dropped_since_warning,
                        ", ".join(f"{n} {_KIND_NAMES[k]}" for k, n in self.dropped.items()))
            self._last_warning = now
            self._dropped_since_warning = 0

    def close(self, timeout=CLOSE_TIMEOUT_S):
        """Write what is queued and close the client, waiting at most timeout."""
        self._closing = True
        self._closed.set()
        self._wake.set()
        if self._thread is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the control store did not take the last %d log entries within "
                        "%.0f s; they are lost", len(self._queue) + len(self._coalesced),
                        timeout)

    # ------------------------------------------------------------ writer thread
    def _run(self, connect):
        delay = 0.1
        while self.gcs is None:
            try:
                self.gcs = connect()
            except Exception as exc:
                if self._closing:
                    return
                log.error("cannot reach the control store (%s); retrying in %.1f s; "
                          "tasks run meanwhile, their records wait (up to %d)",
                          exc, delay, self.max_queued)
                self._closed.wait(delay)
                delay = min(delay * 2, RETRY_MAX_S)
        delay = 0.1
        while True:
            self._wake.wait()
            if not self._closing:
                time.sleep(self.gather_s)
            # Clear, then lower the flag: an append in between sees the flag
            # still up and does not signal, but this pass drains it. The
            # other order could lose the wake-up of an append for good.
            self._wake.clear()
            self._signalled = False
            closing = self._closing
            try:
                done = self._drain(closing)
                delay = 0.1
            except Exception as exc:
                # ControlStoreError after the client's own reconnect timeout;
                # writes already handed to the client stay there for its next
                # flush. Anything else is a bug: keep logging, never stop.
                self._log_write_error(exc)
                if closing:
                    break
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                self._wake.set()
                continue
            if closing:
                break
            if not done:
                self._wake.set()          # more to write once the client caught up
            elif self.dropped_total > self._reported_drops:
                total = self.dropped_total
                log.warning("the control store takes the log again; %d log entries were "
                            "dropped while it did not (%d since this node started)",
                            total - self._reported_drops, total)
                self._reported_drops = total
        try:
            self.gcs.close()
        except Exception:
            log.exception("closing the control store client")

    def _log_write_error(self, exc):
        now = time.monotonic()
        if now - self._last_error_log >= WARN_INTERVAL_S:
            self._last_error_log = now
            log.error("writing the log to the control store failed (%s: %s); retrying",
                      type(exc).__name__, exc, exc_info=not _is_control_store_error(exc))

    def _drain(self, closing=False):
        """Write what is queued; False if the client's buffer filled first."""
        gcs, queue = self.gcs, self._queue
        while queue or self._coalesced:
            if not closing and gcs.unsent_writes() > CLIENT_BACKLOG:
                # The control store has not taken writes for a while: send
                # (this waits while it is away) before buffering more.
                gcs.flush(wait=False)
                if gcs.unsent_writes() > CLIENT_BACKLOG:
                    return False
            writes = self._records(DRAIN_CHUNK)
            self.written += len(writes)
            self._trim(len(writes), writes)
            gcs.write_encoded(writes)
        gcs.flush(wait=False)
        return True

    def _records(self, limit):
        """Up to limit queued entries as control-store writes."""
        queue, writes = self._queue, []
        task_order, object_order = self._task_order, self._object_order
        node_id, node_hex = self.node_id, self.node_hex
        while queue and len(writes) < limit:
            item = queue.popleft()
            kind = item[0]
            if kind == _TASK:
                _, spec, state, when, size = item
                self._bytes_out += size
                task_id = spec.task_id
                key = task_key(task_id, when)
                size += TASK_RECORD_BYTES
                task_order.append((key, spec.num_returns, size))
                self._task_bytes += size
                for arg in spec.args:
                    if arg[0] == "r":
                        self._pin_producers(task_id, spec.args)
                        break
                writes.append(("tasks", key,
                               encode_value(task_record(spec, state, when, node_id))))
            elif kind == _OBJECT:
                _, object_id, object_kind, size, task_id = item
                object_order.append(object_id)
                writes.append(("objects", object_id, encode_value({
                    "kind": KIND_NAMES[object_kind], "size": size, "node": node_hex,
                    "task_id": task_id.hex() if task_id else None})))
            elif kind == _ERROR:
                self._error_order.append(item[1])
                writes.append(("errors", item[1], encode_value(item[2])))
            else:
                writes.append((item[1], item[2], encode_value(item[3])))
        coalesced = self._coalesced
        while coalesced and not queue and len(writes) < limit:
            (table, key), value = coalesced.popitem()
            writes.append((table, key, encode_value(value)))
        return writes

    def _pin_producers(self, task_id, args):
        # The task that made a ref argument is needed as long as this record
        # is: recomputing this task's results may need that argument again.
        producers = {ids.task_of(arg[1]) for arg in args
                     if arg[0] == "r" and not ids.is_put(arg[1])}
        producers.discard(task_id)
        if producers:
            self._pinned_by[task_id] = producers
            pins = self._pins
            for producer in producers:
                pins[producer] = pins.get(producer, 0) + 1

    def _task_needed(self, task_id, num_returns):
        if self._pins and task_id in self._pins:
            return True
        if num_returns == 1:
            return self._is_held(task_id + _FIRST_RETURN)
        is_held = self._is_held
        return any(is_held(ids.return_object_id(task_id, i)) for i in range(1, num_returns + 1))

    def _trim(self, written, writes):
        """Delete (append to writes) the oldest records nobody needs beyond
        the history sizes."""
        budget = TRIM_CHECKS + 2 * written
        order = self._task_order
        excess = len(order) - self.task_history
        # Once per task record in a long run: the usual case (one return, no
        # pins) is a single membership test, without a call per record.
        is_held, pins, pinned_by = self._is_held, self._pins, self._pinned_by
        # While a burst of tasks runs, the oldest records are mostly of
        # results still held (a driver waiting for all of them): a run of
        # needed records ends the pass instead of cycling through thousands
        # of them after every batch written. The next batch goes on from
        # there, so a block of held records is passed within a few batches
        # (the table exceeds its size by at most about twice what is held).
        streak, max_streak = 0, max(NEEDED_STREAK, written // 2)
        while ((excess > 0 or self._task_bytes > self.task_history_bytes)
               and budget > 0 and order and streak < max_streak):
            budget -= 1
            record = order.popleft()
            key = record[0]
            task_id = key[TASK_KEY_TIME_BYTES:]
            if ((pins and task_id in pins)
                    or (is_held(task_id + _FIRST_RETURN) if record[1] == 1
                        else self._task_needed(task_id, record[1]))):
                order.append(record)                     # looked at again later
                streak += 1
                continue
            streak = 0
            writes.append(("tasks", key, None))
            self._task_bytes -= record[2]
            self.deleted += 1
            excess -= 1
            if pinned_by:
                for producer in pinned_by.pop(task_id, ()):
                    left = pins[producer] - 1
                    if left:
                        pins[producer] = left
                    else:
                        del pins[producer]
        order = self._object_order
        excess = len(order) - self.object_history
        streak = 0
        while excess > 0 and budget > 0 and order and streak < max_streak:
            budget -= 1
            object_id = order.popleft()
            if is_held(object_id):
                order.append(object_id)
                streak += 1
                continue
            streak = 0
            writes.append(("objects", object_id, None))
            self.deleted += 1
            excess -= 1
        order = self._error_order
        while len(order) > self.error_history:
            writes.append(("errors", order.popleft(), None))
            self.deleted += 1


def _is_control_store_error(exc):
    from minray.gcs.client import ControlStoreError
    return isinstance(exc, ControlStoreError)
