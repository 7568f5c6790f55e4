"""A first-in, first-out queue shared by drivers, tasks and actors.

The items live in an async actor. A blocked ``get`` or ``put`` is a
coroutine waiting inside that actor, so it does not hold the actor up: other
callers' puts and gets run meanwhile. The actor answers "no item" or "no
room" with a status instead of raising, and the caller's process raises
Empty or Full: a timed-out ``get`` is normal use, not a failed task to record.
"""
import asyncio
import collections.abc
import numbers
import queue as _stdlib_queue

import minray


class Empty(_stdlib_queue.Empty):
    """get found no item (at once, or within its timeout)."""


class Full(_stdlib_queue.Full):
    """put found no room (at once, or within its timeout)."""


class _QueueActor:
    """Holds the items. Every method runs on the actor's event loop."""

    def __init__(self, maxsize):
        self.maxsize = maxsize
        self._queue = None

    @property
    def queue(self):
        # Made on first use, on the actor's loop: an asyncio.Queue binds to the
        # loop it is first used on, and __init__ runs outside that loop.
        if self._queue is None:
            self._queue = asyncio.Queue(self.maxsize)
        return self._queue

    def qsize(self):
        return self.queue.qsize()

    def empty(self):
        return self.queue.empty()

    def full(self):
        return self.queue.full()

    async def put(self, item, timeout=None):
        try:
            await asyncio.wait_for(self.queue.put(item), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def get(self, timeout=None):
        try:
            return True, await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return False, None

    def put_nowait(self, item):
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            return False
        return True

    def put_nowait_batch(self, items):
        if self.maxsize > 0 and len(items) + self.queue.qsize() > self.maxsize:
            return False, self.queue.qsize()
        for item in items:
            self.queue.put_nowait(item)
        return True, self.queue.qsize()

    def get_nowait(self):
        try:
            return True, self.queue.get_nowait()
        except asyncio.QueueEmpty:
            return False, None

    def get_nowait_batch(self, num_items):
        if num_items > self.queue.qsize():
            return False, self.queue.qsize()
        return True, [self.queue.get_nowait() for _ in range(num_items)]


_QueueActorClass = minray.remote(_QueueActor)


class Queue:
    """A FIFO queue backed by an actor; pass it to tasks and actors freely.

    ``maxsize`` <= 0 means unbounded. ``actor_options`` go to the actor's
    ``.options(...)`` (e.g. ``{"num_cpus": 1}`` or a ``name``).
    """

    def __init__(self, maxsize=0, actor_options=None):
        if isinstance(maxsize, bool) or not isinstance(maxsize, int):
            raise TypeError(f"maxsize must be an int, got {type(maxsize).__name__}")
        if actor_options is not None and not isinstance(actor_options, dict):
            raise TypeError(f"actor_options must be a dict of actor options, got "
                            f"{type(actor_options).__name__}")
        self.maxsize = maxsize
        self.actor = _QueueActorClass.options(**(actor_options or {})).remote(maxsize)

    def _actor(self):
        if self.actor is None:
            raise RuntimeError("this Queue was shut down; make a new Queue")
        return self.actor

    def __len__(self):
        return self.size()

    def size(self):
        """The number of items in the queue now."""
        return minray.get(self._actor().qsize.remote())

    qsize = size

    def empty(self):
        return minray.get(self._actor().empty.remote())

    def full(self):
        return minray.get(self._actor().full.remote())

    # ------------------------------------------------------------ put
    def put(self, item, block=True, timeout=None):
        """Add item; with block, wait for room (up to timeout seconds), else raise Full."""
        if not block:
            return self.put_nowait(item)
        _check_timeout(timeout)
        if not minray.get(self._actor().put.remote(item, timeout)):
            raise Full(f"no room in the queue (maxsize {self.maxsize}) within {timeout} s")

    async def put_async(self, item, block=True, timeout=None):
        """put for asyncio code: awaits instead of blocking the event loop."""
        if not block:
            added = await self._actor().put_nowait.remote(item)
            timeout = 0
        else:
            _check_timeout(timeout)
            added = await self._actor().put.remote(item, timeout)
        if not added:
            raise Full(f"no room in the queue (maxsize {self.maxsize}) within {timeout} s")

    def put_nowait(self, item):
        """Add item if there is room now, else raise Full."""
        if not minray.get(self._actor().put_nowait.remote(item)):
            raise Full(f"the queue is full (maxsize {self.maxsize})")

    def put_nowait_batch(self, items):
        """Add all items at once if there is room for all of them, else none (Full)."""
        if not isinstance(items, collections.abc.Iterable):
            raise TypeError(f"put_nowait_batch needs an iterable of items, got "
                            f"{type(items).__name__}")
        items = list(items)
        added, size = minray.get(self._actor().put_nowait_batch.remote(items))
        if not added:
            raise Full(f"cannot add {len(items)} items to a queue holding {size} "
                       f"(maxsize {self.maxsize})")

    # ------------------------------------------------------------ get
    def get(self, block=True, timeout=None):
        """Remove and return the oldest item; with block, wait for one (up to
        timeout seconds), else raise Empty."""
        if not block:
            return self.get_nowait()
        _check_timeout(timeout)
        found, item = minray.get(self._actor().get.remote(timeout))
        if not found:
            raise Empty(f"no item arrived in the queue within {timeout} s")
        return item

    async def get_async(self, block=True, timeout=None):
        """get for asyncio code: awaits instead of blocking the event loop."""
        if not block:
            found, item = await self._actor().get_nowait.remote()
            timeout = 0
        else:
            _check_timeout(timeout)
            found, item = await self._actor().get.remote(timeout)
        if not found:
            raise Empty(f"no item arrived in the queue within {timeout} s")
        return item

    def get_nowait(self):
        """Remove and return the oldest item if there is one, else raise Empty."""
        found, item = minray.get(self._actor().get_nowait.remote())
        if not found:
            raise Empty("the queue is empty")
        return item

    def get_nowait_batch(self, num_items):
        """Remove and return the num_items oldest items, or none (Empty) if there
        are fewer."""
        if isinstance(num_items, bool) or not isinstance(num_items, int):
            raise TypeError(f"num_items must be an int, got {type(num_items).__name__}")
        if num_items < 0:
            raise ValueError(f"num_items must be >= 0, got {num_items}")
        found, items = minray.get(self._actor().get_nowait_batch.remote(num_items))
        if not found:
            raise Empty(f"cannot get {num_items} items from a queue holding {items}")
        return items

    # ------------------------------------------------------------ end
    def shutdown(self, force=False, grace_period_s=5):
        """Stop the queue's actor: its items are lost, and calls still waiting
        in it (a blocked get or put) fail with RayActorError.

        Without force, the calls this process sent before are let through
        first (waiting up to grace_period_s seconds); with force it stops at once.
        """
        actor, self.actor = self.actor, None
        if actor is None:
            return
        if not force:
            try:
                # Calls from one caller start in order: the reply means all
                # of ours before it have started (and, unless blocked, ended).
                minray.wait([actor.qsize.remote()], timeout=grace_period_s)
            except Exception:           # the actor is already gone: nothing to wait for
                pass
        minray.kill(actor)


def _check_timeout(timeout):
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, numbers.Real)
                                or timeout < 0):
        raise ValueError(f"timeout must be None or a number of seconds >= 0, got {timeout!r}")


__all__ = ["Empty", "Full", "Queue"]
