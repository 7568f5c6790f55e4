"""Futures for ObjectRefs: `ref.future()` and `await ref`.

One daemon thread per process resolves every outstanding future, so a
thousand coroutines awaiting refs cost one thread, not a thousand; it exits
when none is left. It reads
the node manager's messages like any waiting thread (see CoreClient), and
after each batch resolves the futures whose objects have arrived.
"""
import concurrent.futures
import threading

from minray.exceptions import RaySystemError

POLL_S = 1.0        # how often a waiting resolver checks that the client is still open


class RefFutures:
    def __init__(self, client):
        self.client = client
        self.lock = threading.Lock()
        self.waiting = {}            # object id -> [(ObjectRef, Future)]
        self.thread = None

    def future(self, ref):
        """A concurrent.futures.Future that gets ref's value (or its error)."""
        fut = concurrent.futures.Future()
        object_id = ref.binary()
        if self.client.closed:
            fut.set_exception(RaySystemError("minray is shut down: the ref cannot be resolved"))
            return fut
        # The ref rides along so its object stays alive until it is resolved.
        with self.lock:
            self.waiting.setdefault(object_id, []).append((ref, fut))
            if self.thread is None:
                self.thread = threading.Thread(target=self._resolve_loop, daemon=True,
                                               name="minray-futures")
                self.thread.start()
        # Subscribes to the object if this process has not yet; the reply wakes
        # whichever thread is reading, and the resolver re-checks after it.
        self.client._missing([object_id])
        # Somebody waits for it now: a submission held back to go with others
        # (the task that makes it, maybe) goes at once.
        self.client.send_gathered()
        return fut

    def _arrived(self):
        objects = self.client.objects
        with self.lock:
            return [o for o in self.waiting if o in objects]

    def _resolve_loop(self):
        client = self.client
        try:
            while not client.closed:
                client.wait_until(lambda: bool(self._arrived()) or client.closed, POLL_S)
                for object_id in self._arrived():
                    with self.lock:
                        entries = self.waiting.pop(object_id, [])
                    self._resolve(object_id, entries)
                with self.lock:
                    if not self.waiting:          # nothing left: the next future() restarts us
                        self.thread = None
                        return
        except RaySystemError:
            pass
        self._fail_all()

    def _resolve(self, object_id, entries):
        try:
            value = self.client.value(object_id)
        except Exception as exc:                  # the task's error goes to the awaiter
            for _, fut in entries:
                fut.set_exception(exc)
            return
        for _, fut in entries:
            fut.set_result(value)

    def _fail_all(self):
        with self.lock:
            entries = [e for es in self.waiting.values() for e in es]
            self.waiting.clear()
            self.thread = None
        for _, fut in entries:
            fut.set_exception(RaySystemError(
                "lost the connection to the node manager before the object arrived"))
