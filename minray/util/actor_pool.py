"""ActorPool: spread work over a fixed set of actors, one call per actor at a time.

Everything here runs in the caller's process: the pool only remembers which
actor is busy with which call, and hands an actor its next value when its
previous result has been collected.
"""
import collections

from minray.runtime.object_ref import ObjectRef

_TIMEOUT_MESSAGE = "timed out waiting for a result of the ActorPool"


class ActorPool:
    """A fixed set of actor handles that values are mapped over.

    ``fn(actor, value)`` must call one method of ``actor`` and return what
    ``.remote()`` returned: an ObjectRef, or a list of them for a method with
    ``num_returns`` > 1.
    """

    def __init__(self, actors):
        actors = list(actors)
        from minray.actor import ActorHandle
        for actor in actors:
            if not isinstance(actor, ActorHandle):
                raise TypeError(f"ActorPool needs actor handles, got {type(actor).__name__}: "
                                f"{actor!r:.60}")
        self._idle_actors = actors
        self._in_flight = {}                 # submission index -> (refs, actor)
        self._next_index = 0                 # index the next submission gets
        self._pending_submits = collections.deque()   # (fn, value) waiting for an actor

    # ------------------------------------------------------------ submitting
    def submit(self, fn, value):
        """Run ``fn(actor, value)`` on an idle actor, or as soon as one is free."""
        if not self._idle_actors:
            self._pending_submits.append((fn, value))
            return
        actor = self._idle_actors.pop()
        refs = fn(actor, value)
        if isinstance(refs, ObjectRef):
            pass
        elif (isinstance(refs, (list, tuple)) and refs
              and all(isinstance(r, ObjectRef) for r in refs)):
            refs = list(refs)
        else:
            self._idle_actors.append(actor)
            raise TypeError(
                "the function given to ActorPool must call a method of the actor and return "
                f"its ObjectRef (or list of ObjectRefs), e.g. lambda a, v: a.f.remote(v); "
                f"it returned {type(refs).__name__}")
        self._in_flight[self._next_index] = (refs, actor)
        self._next_index += 1

    def map(self, fn, values):
        """Submit every value now; return an iterator of the results in order.

        As in Ray, results of earlier submissions that were not collected yet
        are discarded first.
        """
        self._discard_in_flight()
        for value in values:
            self.submit(fn, value)
        return self._results(self.get_next)

    def map_unordered(self, fn, values):
        """Like map, but yields each result as soon as it is ready."""
        self._discard_in_flight()
        for value in values:
            self.submit(fn, value)
        return self._results(self.get_next_unordered)

    def _results(self, get):
        while self.has_next():
            yield get()

    def _discard_in_flight(self):
        for index in list(self._in_flight):
            self._collect(index)

    # ------------------------------------------------------------ collecting
    def has_next(self):
        """Whether a submitted call's result has yet to be collected."""
        return bool(self._in_flight)

    def get_next(self, timeout=None, ignore_if_timedout=False):
        """The result of the oldest uncollected submission, waiting for it.

        After ``timeout`` seconds raises TimeoutError; the call stays in the
        pool unless ``ignore_if_timedout``, which drops it (its actor becomes
        free again) before raising.
        """
        if not self.has_next():
            raise StopIteration("no more results to get: submit() first")
        index = min(self._in_flight)
        refs = self._in_flight[index][0]
        if timeout is not None and not self._ready([refs], timeout):
            if ignore_if_timedout:
                self._collect(index)
                raise TimeoutError(f"{_TIMEOUT_MESSAGE}; the call was dropped from the pool")
            raise TimeoutError(_TIMEOUT_MESSAGE)
        return self._value(self._collect(index))

    def get_next_unordered(self, timeout=None, ignore_if_timedout=False):
        """The result of whichever submission finishes first, waiting for one.

        Timeouts as in get_next; ``ignore_if_timedout`` drops the oldest call.
        """
        if not self.has_next():
            raise StopIteration("no more results to get: submit() first")
        import minray
        first_ref = {self._first(refs): index for index, (refs, _) in self._in_flight.items()}
        ready, _ = minray.wait(list(first_ref), num_returns=1, timeout=timeout)
        if not ready:
            if ignore_if_timedout:
                self._collect(min(self._in_flight))
                raise TimeoutError(f"{_TIMEOUT_MESSAGE}; the oldest call was dropped "
                                   "from the pool")
            raise TimeoutError(_TIMEOUT_MESSAGE)
        return self._value(self._collect(first_ref[ready[0]]))

    def _collect(self, index):
        """Forget submission `index` and free its actor; return its refs."""
        refs, actor = self._in_flight.pop(index)
        self._return_actor(actor)
        return refs

    @staticmethod
    def _first(refs):
        # All returns of one call arrive together: the first stands for all.
        return refs[0] if isinstance(refs, list) else refs

    def _ready(self, refs_list, timeout):
        import minray
        ready, _ = minray.wait([self._first(r) for r in refs_list], num_returns=1,
                               timeout=timeout)
        return bool(ready)

    @staticmethod
    def _value(refs):
        import minray
        return minray.get(refs)

    # ------------------------------------------------------------ actors
    def has_free(self):
        """Whether an actor is idle and no submission is waiting for one."""
        return bool(self._idle_actors) and not self._pending_submits

    def pop_idle(self):
        """Take an idle actor out of the pool (None if none is free)."""
        if self.has_free():
            return self._idle_actors.pop()
        return None

    def push(self, actor):
        """Add an actor to the pool; it starts on a waiting submission if any."""
        busy = [a for _, a in self._in_flight.values()]
        if actor in self._idle_actors or actor in busy:
            raise ValueError("the actor already belongs to this ActorPool")
        self._return_actor(actor)

    def _return_actor(self, actor):
        self._idle_actors.append(actor)
        if self._pending_submits:
            self.submit(*self._pending_submits.popleft())
