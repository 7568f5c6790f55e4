"""multiprocessing.Pool's API, with minray actors as the worker processes.

    from minray.util.multiprocessing import Pool
    with Pool(4) as pool:
        print(pool.map(f, range(100)))

Each worker is an actor, so it keeps what the initializer set up for as long
as it lives. Work travels in chunks: one actor call runs ``func`` over a list
of items and returns one (succeeded, value) pair per item, so an exception
comes back as a value (of its own type, with the remote traceback attached
as its ``__cause__``, as in the standard library) and one bad item does not
lose its chunk's other results.

Calls are submitted from the caller's thread; the results are collected by
minray's futures thread, which also runs ``callback``/``error_callback``.
"""
import builtins
import collections
import functools
import itertools
import multiprocessing as _stdlib_multiprocessing
import multiprocessing.pool as _stdlib_pool
import os
import threading
import time
import traceback
import warnings

import minray
from minray.exceptions import RayActorError
from minray.serialization import serialize

__all__ = ["AsyncResult", "IMapIterator", "Pool", "TimeoutError"]

_RUN, _CLOSE, _TERMINATE = "running", "closed", "terminated"


class TimeoutError(_stdlib_multiprocessing.TimeoutError, builtins.TimeoutError):
    """A result was not ready in time: both multiprocessing.TimeoutError and
    the built-in TimeoutError, so either ``except`` catches it."""


# ---------------------------------------------------------------- the worker

def _sendable(exc):
    """exc if it can travel back to the caller, else a RuntimeError saying what it was."""
    try:
        serialize(exc)
        return exc
    except Exception as why:
        return RuntimeError(f"{type(exc).__name__}: {exc} (the exception itself could not "
                            f"be sent back: {why})")


class _PoolWorker:
    """One worker of a Pool: runs the initializer once, then chunks of work."""

    def __init__(self, initializer, initargs):
        if initializer is not None:
            initializer(*initargs)

    def pid(self):
        return os.getpid()

    def run_chunk(self, func, chunk, star):
        results = []
        for item in chunk:
            try:
                results.append((True, func(*item) if star else func(item)))
            except Exception as exc:
                # From the user's function on (this frame left out), framed
                # as the standard library frames a worker's traceback.
                lines = traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next)
                remote = '\n"""\n' + "".join(lines) + '"""'
                results.append((False, (_sendable(exc), remote)))
        return results


_PoolWorkerClass = minray.remote(_PoolWorker)


def _as_raised(outcome):
    """The exception a failed item raises in the caller, with its traceback."""
    exc, remote = outcome
    exc.__cause__ = _stdlib_pool.RemoteTraceback(remote)
    return exc


class _Worker:
    """The pool's record of one actor: its handle and its calls in flight."""

    def __init__(self, handle):
        self.handle = handle                 # the owned handle; None once retired
        # A handle that does not keep the actor alive, for terminate() to kill.
        self.kill_handle = type(handle)(handle._actor_id, handle._class_name, handle._methods)
        self.in_flight = 0
        self.sent = 0
        self.dead = False


# ---------------------------------------------------------------- results

class AsyncResult:
    """The result of apply_async, map_async or starmap_async."""

    def __init__(self, num_chunks, single, callback, error_callback):
        self._single = single
        self._callback = callback
        self._error_callback = error_callback
        self._chunks = [None] * num_chunks
        self._remaining = num_chunks     # guarded by the pool's lock
        self._event = threading.Event()
        self._value = None
        self._error = None
        if not num_chunks:
            self._finish()

    def _chunk_done(self, index, outcome):
        """Record a chunk (pool lock held); after the last, return what finishes up."""
        self._chunks[index] = outcome
        self._remaining -= 1
        return self._finish if self._remaining == 0 else None

    def _finish(self):
        values = []
        for outcome in self._chunks:
            if isinstance(outcome, BaseException):        # the whole chunk was lost
                self._error = outcome
                break
            for succeeded, value in outcome:
                if not succeeded:
                    self._error = _as_raised(value)
                    break
                values.append(value)
            if self._error is not None:
                break
        if self._error is None:
            self._value = values[0] if self._single else values
        self._chunks = None              # the values live on in _value only
        try:
            # As the standard library: the callback has run when get() returns.
            if self._error is None and self._callback is not None:
                self._callback(self._value)
            elif self._error is not None and self._error_callback is not None:
                self._error_callback(self._error)
        finally:
            self._event.set()

    def ready(self):
        """Whether the work has finished (well or not)."""
        return self._event.is_set()

    def successful(self):
        """Whether it finished without an exception; ValueError if not finished."""
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._error is None

    def wait(self, timeout=None):
        """Wait until ready, or for timeout seconds (no error either way)."""
        self._event.wait(timeout)

    def get(self, timeout=None):
        """The result; raises the work's exception, or TimeoutError after timeout seconds."""
        if not self._event.wait(timeout):
            raise TimeoutError(f"the result was not ready within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._value


class IMapIterator:
    """The iterator imap and imap_unordered return.

    The iterable is read as results are used: while the caller waits in
    ``next()``, each worker that falls idle is sent the next chunk, as the
    standard library's workers each take the next task when free. A chunk
    never waits behind another on a busy worker. ``close()`` of the pool
    sends whatever is left at once.
    """

    def __init__(self, pool, func, iterable, chunksize, ordered):
        self._pool = pool
        self._func = func
        self._source = iter(iterable)
        self._chunksize = chunksize
        self._ordered = ordered
        # All of the state below is guarded by the pool's lock.
        self._sent = 0                   # chunks sent
        self._sizes = {}                 # chunk index -> its number of items, until consumed
        self._finished = {}              # chunk index -> outcome, until consumed
        self._finish_order = collections.deque()   # for unordered: chunks as they finish
        self._next_chunk = 0             # for ordered: the chunk to yield next
        self._consumed = 0               # chunks whose items moved to the buffer
        self._buffer = collections.deque()
        self._exhausted = False          # the iterable has no more items (or raised)
        self._source_error = None
        # Results that may wait unconsumed (memory bound for an endless iterable).
        self._max_unconsumed = 4 * max(1, len(pool._workers))

    # ------------------------------------------------------------ for the pool
    def _take_chunk(self):
        """The next chunk to send, or None for now (pool lock held)."""
        if self._exhausted or len(self._sizes) >= self._max_unconsumed:
            return None
        try:
            chunk = list(itertools.islice(self._source, self._chunksize))
        except Exception as exc:         # the caller's iterable raised: the error comes last
            self._source_error, self._exhausted = exc, True
            return None
        if not chunk:
            self._exhausted = True
            return None
        index = self._sent
        self._sent += 1
        self._sizes[index] = len(chunk)
        return self._func, chunk, False, lambda outcome: self._chunk_done(index, outcome)

    def _chunk_done(self, index, outcome):
        self._finished[index] = outcome
        if not self._ordered:
            self._finish_order.append(index)

    # ------------------------------------------------------------ for the caller
    def _arrived(self):
        if self._ordered:
            return self._next_chunk in self._finished
        return bool(self._finish_order)

    def _all_consumed(self):
        return self._consumed == self._sent and (
            self._exhausted or self._pool._state == _TERMINATE)

    def _take(self, index):
        """Move chunk index's items (exceptions included, as in Ray) to the buffer."""
        outcome = self._finished.pop(index)
        size = self._sizes.pop(index)
        self._consumed += 1
        if isinstance(outcome, BaseException):        # the whole chunk was lost
            self._buffer.extend([outcome] * size)
        else:
            self._buffer.extend(value if ok else _as_raised(value) for ok, value in outcome)

    def __iter__(self):
        return self

    def next(self, timeout=None):
        """The next result; TimeoutError if none arrives within timeout seconds.

        An item whose function raised is returned as its exception object,
        as Ray's pool does (the standard library's raises it here).
        """
        pool = self._pool
        with pool._lock:
            while not self._buffer:
                if not pool._drive(lambda: self._arrived() or self._all_consumed(), timeout):
                    raise TimeoutError(f"no result arrived within {timeout} s")
                if self._arrived():
                    if self._ordered:
                        self._take(self._next_chunk)
                        self._next_chunk += 1
                    else:
                        self._take(self._finish_order.popleft())
                elif self._source_error is not None:
                    error, self._source_error = self._source_error, None
                    raise error
                elif self._exhausted:
                    raise StopIteration
                else:
                    raise ValueError("Pool not running: it was terminated before this "
                                     "iterator's remaining items were sent")
            pool._dispatch()             # keep the workers busy while the caller works
            return self._buffer.popleft()

    __next__ = next


# ---------------------------------------------------------------- the pool

class Pool:
    """A pool of worker actors with multiprocessing.Pool's methods.

    processes: how many workers (default: the cluster's CPUs). If minray is
    not initialized, a local cluster with that many CPUs is started, or the
    cluster at ``ray_address`` is joined. On a running cluster, asking for
    more workers than it has CPUs is a ValueError, as in Ray.
    initializer(*initargs) runs once in each worker. maxtasksperchild: after
    that many chunks a worker is replaced by a fresh one. ``ray_remote_args``
    are actor options for the workers (e.g. ``{"num_gpus": 1}``); ``context``
    is accepted and ignored.
    """

    def __init__(self, processes=None, initializer=None, initargs=(), maxtasksperchild=None,
                 context=None, ray_address=None, ray_remote_args=None):
        if processes is not None and (isinstance(processes, bool)
                                      or not isinstance(processes, int) or processes < 1):
            raise ValueError(f"Number of processes must be at least 1, got {processes!r}")
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be a callable, got {type(initializer).__name__}")
        if maxtasksperchild is not None and (isinstance(maxtasksperchild, bool)
                                             or not isinstance(maxtasksperchild, int)
                                             or maxtasksperchild < 1):
            raise ValueError(f"maxtasksperchild must be a positive int or None, "
                             f"got {maxtasksperchild!r}")
        if ray_remote_args is not None and not isinstance(ray_remote_args, dict):
            raise TypeError(f"ray_remote_args must be a dict of actor options, got "
                            f"{type(ray_remote_args).__name__}")
        if context is not None:
            warnings.warn("minray's Pool ignores the context argument: its workers are "
                          "minray actors, not processes started by multiprocessing",
                          stacklevel=2)
        self._initializer = initializer
        self._initargs = tuple(initargs or ())
        self._maxtasksperchild = maxtasksperchild
        self._worker_class = _PoolWorkerClass.options(**(ray_remote_args or {}))
        self._lock = threading.Condition(threading.RLock())
        self._state = _RUN
        self._outstanding = 0            # chunks sent whose results have not arrived
        self._retiring = []              # replaced workers still finishing their chunks
        self._iterators = []             # imap iterators that may send more chunks
        self._workers = []
        processes = self._connect(processes, ray_address)
        self._workers = [self._new_worker() for _ in range(processes)]
        try:
            # As in Ray: an initializer that raises fails the constructor.
            minray.get([w.handle.pid.remote() for w in self._workers])
        except BaseException:
            self.terminate()
            raise

    @staticmethod
    def _connect(processes, ray_address):
        if not minray.is_initialized():
            if ray_address is not None and ray_address != "local":
                minray.init(address=ray_address)
            else:
                minray.init(num_cpus=processes)
        cpus = int(minray.cluster_resources().get("CPU", 0))
        if processes is None:
            return max(cpus, 1)
        if processes > cpus:
            raise ValueError(f"a Pool of {processes} processes needs as many CPUs, but the "
                             f"cluster has {cpus}; ask for at most {cpus} processes")
        return processes

    def _new_worker(self):
        return _Worker(self._worker_class.remote(self._initializer, self._initargs))

    def __reduce__(self):
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    def __repr__(self):
        return f"<{type(self).__name__} state={self._state} pool_size={len(self._workers)}>"

    # ------------------------------------------------------------ sending work
    # Work is sent from the caller's threads only (minray's task ids are made
    # per thread of control); the futures thread only records what arrived.

    def _check_running(self):
        if self._state != _RUN:
            raise ValueError("Pool not running")

    def _live_workers(self):
        """The workers, a fresh one in place of any whose process died (lock held)."""
        for i, worker in enumerate(self._workers):
            if worker.dead:
                self._workers[i] = self._new_worker()
        return self._workers

    def _send(self, worker, func, chunk, star, on_done):
        """Send one chunk to worker (lock held). on_done(outcome) gets its list
        of (ok, value) pairs, or the exception that lost the whole chunk."""
        ref = worker.handle.run_chunk.remote(func, chunk, star)
        worker.in_flight += 1
        worker.sent += 1
        self._outstanding += 1
        if self._maxtasksperchild is not None and worker.sent >= self._maxtasksperchild:
            self._workers[self._workers.index(worker)] = self._new_worker()
            self._retire(worker)
        ref.future().add_done_callback(lambda f: self._chunk_finished(worker, f, on_done))

    def _send_now(self, func, chunk, star, on_done):
        """Send to the worker with the fewest chunks in flight (lock held)."""
        if not self._workers:
            raise ValueError("Pool not running")
        self._send(min(self._live_workers(), key=lambda w: w.in_flight),
                   func, chunk, star, on_done)

    def _dispatch(self):
        """Give each idle worker the next chunk of an imap (lock held)."""
        self._iterators = [it for it in self._iterators if not it._exhausted]
        for iterator in self._iterators:
            for worker in self._live_workers():
                if worker.in_flight:
                    continue
                work = iterator._take_chunk()
                if work is None:
                    break
                self._send(worker, *work)

    def _drive(self, done, timeout):
        """Wait (lock held) until done(), sending imap chunks to workers as
        they fall idle; False if timeout seconds pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._dispatch()
            if done():
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._lock.wait(left)

    def _retire(self, worker):
        # Dropping the last handle stops the actor once its calls are done.
        worker.handle = None
        if worker.in_flight:
            self._retiring.append(worker)

    def _chunk_finished(self, worker, future, on_done):
        try:
            outcome = future.result()
        except BaseException as exc:
            outcome = exc
        with self._lock:
            worker.in_flight -= 1
            self._outstanding -= 1
            if isinstance(outcome, RayActorError):
                worker.dead = True       # replaced before it is given more work
            if worker.handle is None and worker.in_flight == 0 and worker in self._retiring:
                self._retiring.remove(worker)
            finish = on_done(outcome)
            self._lock.notify_all()
        if finish is not None:           # user callbacks run outside the lock
            finish()
            with self._lock:
                self._lock.notify_all()

    @staticmethod
    def _chunksize(num_items, processes):
        # As the standard library: about four chunks per worker.
        chunksize, extra = divmod(num_items, processes * 4)
        return chunksize + 1 if extra else max(chunksize, 1)

    @staticmethod
    def _check_chunksize(chunksize):
        if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize!r}")

    @staticmethod
    def _check_func(func):
        if not callable(func):
            raise TypeError(f"func must be a callable, got {type(func).__name__}")

    def _map_async(self, func, iterable, chunksize, star, callback, error_callback):
        self._check_running()
        self._check_func(func)
        items = list(iterable)
        if chunksize is None:
            chunksize = self._chunksize(len(items), len(self._workers))
        self._check_chunksize(chunksize)
        chunks = [items[i:i + chunksize] for i in range(0, len(items), chunksize)]
        result = AsyncResult(len(chunks), False, callback, error_callback)
        with self._lock:
            # All at once, as Ray does: the result completes (and its callback
            # runs) even if nobody waits for it.
            for index, chunk in enumerate(chunks):
                self._send_now(func, chunk, star,
                               lambda outcome, index=index: result._chunk_done(index, outcome))
        return result

    # ------------------------------------------------------------ the API
    def apply(self, func, args=(), kwds=None, *, kwargs=None):
        """func(*args, **kwds) on a worker; returns its result."""
        return self.apply_async(func, args, kwds, kwargs=kwargs).get()

    def apply_async(self, func, args=(), kwds=None, callback=None, error_callback=None, *,
                    kwargs=None):
        """Like apply, returning an AsyncResult at once. ``kwargs`` is Ray's
        name for ``kwds``."""
        self._check_running()
        self._check_func(func)
        keywords = dict(kwds or {}, **(kwargs or {}))
        call = functools.partial(func, **keywords) if keywords else func
        result = AsyncResult(1, True, callback, error_callback)
        with self._lock:
            self._send_now(call, [tuple(args or ())], True,
                           lambda outcome: result._chunk_done(0, outcome))
        return result

    def map(self, func, iterable, chunksize=None):
        """[func(x) for x in iterable], run in chunks on the workers."""
        return self._map_async(func, iterable, chunksize, False, None, None).get()

    def map_async(self, func, iterable, chunksize=None, callback=None, error_callback=None):
        return self._map_async(func, iterable, chunksize, False, callback, error_callback)

    def starmap(self, func, iterable, chunksize=None):
        """[func(*args) for args in iterable], run in chunks on the workers."""
        return self._map_async(func, iterable, chunksize, True, None, None).get()

    def starmap_async(self, func, iterable, chunksize=None, callback=None, error_callback=None):
        return self._map_async(func, iterable, chunksize, True, callback, error_callback)

    def imap(self, func, iterable, chunksize=1):
        """An iterator of func(x) for x in iterable, in order, read lazily."""
        return self._imap(func, iterable, chunksize, True)

    def imap_unordered(self, func, iterable, chunksize=1):
        """Like imap, yielding each result as soon as it is ready."""
        return self._imap(func, iterable, chunksize, False)

    def _imap(self, func, iterable, chunksize, ordered):
        self._check_running()
        self._check_func(func)
        self._check_chunksize(chunksize)
        try:
            iter(iterable)
        except TypeError:
            raise TypeError(f"imap needs an iterable of items, got {type(iterable).__name__}") \
                from None
        iterator = IMapIterator(self, func, iterable, chunksize, ordered)
        with self._lock:
            self._iterators.append(iterator)
            self._dispatch()
        return iterator

    # ------------------------------------------------------------ ending
    def close(self):
        """Accept no more work; the workers stop once the work sent is done."""
        with self._lock:
            if self._state != _RUN:
                return
            # As the standard library: what imap iterators have left is still done.
            for iterator in self._iterators:
                while True:
                    iterator._max_unconsumed = float("inf")
                    work = iterator._take_chunk()
                    if work is None:
                        break
                    self._send_now(*work)
            self._iterators = []
            self._state = _CLOSE
            for worker in self._workers:
                self._retire(worker)
            self._workers = []
            self._lock.notify_all()

    def terminate(self):
        """Stop the workers now: work in flight fails with RayActorError."""
        with self._lock:
            if self._state == _TERMINATE:
                return
            self._state = _TERMINATE
            doomed = self._workers + self._retiring
            self._workers, self._retiring, self._iterators = [], [], []
            self._lock.notify_all()
        if minray.is_initialized():
            for worker in doomed:
                minray.kill(worker.kill_handle)

    def join(self):
        """Wait until every chunk sent has finished (close or terminate first)."""
        if self._state == _RUN:
            raise ValueError("Pool is still running")
        with self._lock:
            self._lock.wait_for(lambda: self._outstanding == 0)

    def __enter__(self):
        self._check_running()
        return self

    def __exit__(self, *exc_info):
        self.terminate()
