"""What the node manager records in the control store: functions, one record
per finished task (its spec: the lineage), objects in the store, errors and
actors. Nothing here is on a task's path: writes are buffered and sent in
batches, and records made before the control store is up wait in memory.
"""
import logging
import os
import time

from minray.protocol import KIND_NAMES, ActorCallSpec

log = logging.getLogger("minray.node_manager")


class LineageLog:
    def __init__(self, node_id):
        self.node_hex = node_id.hex()
        self.gcs = None
        self.backlog = []           # records made before the control store was up

    def attach(self, gcs):
        """The control store is up: send what waited, write directly from now on."""
        backlog, self.backlog = self.backlog, []
        self.gcs = gcs
        for table, key, value in backlog:
            gcs.put(table, key, value)

    def close(self):
        if self.gcs is not None:
            try:
                self.gcs.close()
            except Exception:
                log.exception("closing the control store client")

    def _put(self, table, key, value):
        if self.gcs is not None:
            self.gcs.put(table, key, value)
        else:
            self.backlog.append((table, key, value))

    def function(self, function_id, name, pickled):
        self._put("functions", function_id, {"name": name, "pickled": pickled})

    def task(self, spec, state):
        """One record per task, when it ends: its spec (the lineage) and state.

        Tasks still queued or running are listed by the node manager itself
        (info "tasks"), so the control store takes one write per task.
        """
        record = {"state": state, "num_returns": spec.num_returns, "node": self.node_hex,
                  "time": time.time(), "spec": tuple(spec)}
        if isinstance(spec, ActorCallSpec):
            record.update(name=spec.method, actor_id=spec.actor_id.hex())
        else:
            record.update(name=spec.name, function_id=spec.function_id.hex(),
                          resources=spec.resources)
        self._put("tasks", spec.task_id, record)

    def object(self, object_id, entry, task_id):
        if entry is not None:
            self._put("objects", object_id, {
                "kind": KIND_NAMES[entry.kind], "size": entry.size, "node": self.node_hex,
                "task_id": task_id.hex() if task_id else None})

    def error(self, kind, name, task_id, text):
        self._put("errors", os.urandom(8), {
            "type": kind, "function": name, "task_id": task_id.hex(), "message": text,
            "time": time.time(), "node": self.node_hex})
        if self.gcs is not None:
            # Sent before the failed result reaches the driver, so error_info()
            # called right after get() raised already sees it.
            self.gcs.flush(wait=False)

    def actor(self, actor_id, record):
        self._put("actors", actor_id, record)
