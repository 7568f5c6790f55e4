"""The runtime inside every driver and worker: its link to the node manager.

It submits tasks, puts and gets objects, and keeps the values this process
knows about. Small values arrive inline in messages; large ones are read
zero-copy from the shared-memory store. Reading the socket is done by
whichever thread is waiting (get, wait, or a worker waiting for work), one at
a time; the others wait on a condition and re-check after each batch.
"""
import collections
import itertools
import select
import socket
import sys
import threading
import time

from minray import ids, wire
from minray.exceptions import RaySystemError, TaskCancelledError
from minray.object_store import SharedStore
from minray.protocol import ERROR, LOCATED, STDERR
# (INLINE_MAX_BYTES is read as core.INLINE_MAX_BYTES by the task and result paths)
from minray.runtime.client_objects import INLINE_MAX_BYTES, ClientObjects  # noqa: F401
from minray.serialization import deserialize

# Owned refs dropped before their value arrived, remembered (bounded) so an
# error that arrives for one of them is still reported as unhandled.
DROPPED_PENDING_MAX = 10_000
BOOKKEEPING_DELAY_S = 0.1          # longest a dropped ref waits to be reported
BACKGROUND_READ_CHUNKS = 64        # most reads of up to 1 MiB per background poll
# Submissions (tasks, actor calls) made in a quick run are sent together, as
# one "batch" message: one encoding, one write and one wake-up of the node
# manager for many, instead of one each (decoding a message costs the node
# manager about as much as handling a submission). The first of a run goes
# at once; the rest wait until a batch is full, anything else is sent, this
# process waits for a result, or SUBMIT_GATHER_S passed (the bookkeeping
# thread sends them then; a busy thread may keep it waiting a few ms more).
# A run's first batch holds GATHER_FIRST_MESSAGES, each next one twice as
# many, up to GATHER_MAX_MESSAGES or GATHER_MAX_BYTES: the workers get their
# first tasks soon, and a long run goes in big batches.
SUBMIT_GATHER_S = 0.001
GATHER_FIRST_MESSAGES = 8
GATHER_MAX_MESSAGES = 128
GATHER_MAX_BYTES = 256 * 1024
SPEC_BYTES = 512                   # a spec's size besides its arguments, about
REF_ARG_BYTES = 64                 # a ref argument's, at most
# A worker's printed output (minray.worker.output) rides ahead of its next
# message; past OUTPUT_SEND_BYTES it wakes the bookkeeping thread to send it
# now, past OUTPUT_PENDING_MAX it is dropped (and the drop reported) rather
# than held without limit.
OUTPUT_SEND_BYTES = 256 * 1024
OUTPUT_PENDING_MAX = 64 << 20
OUTPUT_MESSAGE_CHARS = 128 * 1024  # text per "output" message: under the 1 MiB frame limit

_current = None                     # the CoreClient of this process


def print_output(chunks):
    """Print what tasks printed: each line after its (label pid=..., ip=...)."""
    for prefix, stream_no, text in chunks:
        stream = sys.stderr if stream_no == STDERR else sys.stdout
        lead = f"({prefix}) "
        try:
            stream.write("".join(lead + line + "\n" for line in text.splitlines()))
            stream.flush()
        except (OSError, ValueError):
            return          # our stdout is closed or a closed pipe (| head): nowhere to print


class RequestFailed(str):
    """The node manager's reason for failing a request (a "failed" reply)."""


def current():
    return _current


def set_current(client):
    global _current
    _current = client


class CoreClient(ClientObjects):
    def __init__(self, socket_path, token, role, info, root_task_id):
        self.role = role
        self.sock = wire.connect(socket_path, token)
        self.sock.settimeout(None)
        self.poller = select.poll()
        self.poller.register(self.sock, select.POLLIN)
        self.buffer = bytearray()
        self.recv_view = wire.recv_buffer()      # only the reader (self.reading) uses it
        self.send_lock = threading.Lock()
        self.cond = threading.Condition()
        self.readers_waiting = 0     # threads in cond.wait for their turn to read
        self.reading = False
        self.closed = False
        self.objects = {}            # object id -> (kind, meta, payload)
        self.ref_counts = {}         # object id -> live ObjectRefs in this process
        self.owned = set()           # ids whose value is pushed to us unasked
        # Owned ids ready in another node's store: fetched here only when
        # wanted (get, or wait with fetch_local), as in Ray.
        self.located = set()
        self.wanted = set()          # owned ids get/wait wait for, not ready yet
        self.pending_fetch = []      # located ids wanted here: subscribe to them
        self.borrowed = set()        # ids of refs we were handed (not ours)
        self.pending_borrow = []
        self.errors_raised = set()   # error objects `get` has raised here
        self.errors_arrived = 0      # error objects received so far (wakes `get`)
        self.dropped_pending = collections.OrderedDict()   # see DROPPED_PENDING_MAX
        self.subscribed = set()
        self.pending_free = {}       # id -> whether we owned it, until "free" is sent
        self.pending_escape = []
        self.gathered = []           # frames held back to go in one write (see send)
        self.gathered_messages = []  # the submissions of the run under way, not encoded yet
        self.held_count = 0          # submissions held in both, and about their bytes
        self.held_bytes = 0
        self.gather_limit = GATHER_FIRST_MESSAGES    # messages in the run's next batch
        self.last_gathering_send = 0.0
        self.pending_giveback = []   # worker: tasks to hand back, read while lending
        self.pending_output = collections.deque()   # worker: (job, label, stream, text)
        self.output_lock = threading.Lock()          # for the two counts
        self.output_waiting = threading.Event()      # much output: send it now
        self.pending_output_chars = 0
        self.dropped_output_chars = 0
        self.actor_id = None         # worker: the actor it hosts
        self.concurrent = False      # calls run at once: ids from one shared counter
        self.shared_counter = itertools.count(1)
        self.exported = set()
        self.replies = {}
        self.request_ids = iter(range(1, 1 << 62))
        self.tasks = collections.deque()   # worker: dispatched, not started
        self.executing = False
        self.lending = 0             # worker: inside get/wait with its CPU lent out
        self.cancel_handler = None   # worker: called with the id of a task to cancel
        self.interrupt_requested = False   # worker: cancel the running task at the next wait
        self.start_task(root_task_id)
        self.welcome = None
        self.store = None
        # A driver's namespace, from init(); a worker's is its current job's.
        self.driver_namespace = (info.get("namespace"), bool(info.get("anonymous_namespace")))
        self.job_namespaces = {}     # worker: job id -> (namespace, anonymous)
        self.futures = None          # RefFutures, made on the first ref.future()
        self.send(("hello", role, info))
        threading.Thread(target=self._send_bookkeeping_loop, daemon=True,
                         name="minray-refs").start()

    @property
    def node_address(self):
        """Our node manager's "ip:port" (from its welcome)."""
        return (self.welcome or {}).get("address")

    def ref_futures(self):
        with self.cond:
            if self.futures is None:
                from minray.runtime.futures import RefFutures
                self.futures = RefFutures(self)
            return self.futures

    def attach_store(self, store_name):
        self.store = SharedStore.attach(store_name)

    # ------------------------------------------------------------ sending
    def send(self, message, gather=False):
        """Send a message. With gather (a submission), it may wait, briefly
        and in order with everything sent after it, to go with others."""
        if gather:
            with self.send_lock:
                if self._gather(message):
                    return
        frame = wire.encode(message)
        if len(frame) > wire.ORDINARY_MAX_FRAME:
            _check_size(message, len(frame) - wire.FRAME_HEADER.size)
        with self.send_lock:
            # Built under the lock so escapes and frees reach the node manager
            # in the order they happened, whichever thread sends them.
            frames = self._bookkeeping_frames() if self._has_bookkeeping() else []
            frames.append(frame)
            self._send_frames(frames)

    def _send_frames(self, frames):
        try:
            self._send_locked(b"".join(frames))
            if self.pending_giveback or self.pending_fetch:   # read while we waited
                self._send_locked(b"".join(self._bookkeeping_frames()))
        except OSError as exc:
            raise RaySystemError(f"lost the connection to the node manager: {exc}") from None

    def _gather(self, message):
        """Hold a submission back (send_lock held) while a run of them goes
        on; True if held (or sent with the run it completed)."""
        if self.closed:
            return False                          # (sending says why it can't)
        now = time.monotonic()
        held = self.held_count
        if not held and now - self.last_gathering_send > SUBMIT_GATHER_S:
            self.last_gathering_send = now        # the first of a run goes at once
            self.gather_limit = GATHER_FIRST_MESSAGES
            return False
        self.last_gathering_send = now
        held_bytes = self.held_bytes
        size = SPEC_BYTES
        for arg in message[1][3]:                 # (a task's or call's args)
            size += len(arg[2]) if arg[0] == "v" else REF_ARG_BYTES
        if size > GATHER_MAX_BYTES // 4:
            return False                          # in a frame of its own (and size-checked)
        if (self.pending_escape or self.pending_borrow or self.pending_giveback
                or self.pending_output or self.pending_fetch):
            # What happened before this submission reaches the node manager
            # before it. (Not frees: they may follow. An id waiting to be
            # freed has no ref left here, so no submission made since holds it;
            # a new ref to it takes the free back, see add_ref.)
            self.gathered = self._bookkeeping_frames()
            self.held_count, self.held_bytes = held, held_bytes
        self.gathered_messages.append(message)
        self.held_count += 1
        self.held_bytes += size
        if self.held_count >= self.gather_limit or self.held_bytes >= GATHER_MAX_BYTES:
            self.gather_limit = min(2 * self.gather_limit, GATHER_MAX_MESSAGES)
            self._send_frames(self._bookkeeping_frames())
        elif not held:
            self.output_waiting.set()             # the bookkeeping thread sends them soon
        return True

    def send_gathered(self):
        """Send held-back submissions now: this process is about to wait."""
        self.last_gathering_send = 0.0            # the next submission starts a run
        if self.gathered or self.gathered_messages:
            self._send_bookkeeping()

    def _send_bookkeeping(self):
        with self.send_lock:
            if self._has_bookkeeping():
                self._send_frames(self._bookkeeping_frames())

    def _send_locked(self, data):
        """Send all of data, with send_lock held.

        While the socket is full, read what the node manager sends: it stops
        reading from a client whose output piles up unread (minray.wire), so
        a client that only sent would wait for ever.
        """
        try:
            sent = self.sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        while view:
            try:
                view = view[self.sock.send(view, socket.MSG_DONTWAIT):]
            except BlockingIOError:
                self._read_while_full()

    def _read_while_full(self):
        with self.cond:
            reader = not self.reading
            if reader:
                self.reading = True
        try:
            poller = select.poll()
            poller.register(self.sock, select.POLLOUT | (select.POLLIN if reader else 0))
            # Not the reader: look again soon whether we can become it.
            events = poller.poll(None if reader else 50)
            if reader and any(event & ~select.POLLOUT for _, event in events):
                self._receive(0)
        finally:
            if reader:
                self._done_reading()

    def _send_bookkeeping_loop(self):
        """Background chores of a process that may be busy or idle elsewhere.

        Dropped refs ride along with the next message; if none comes soon (an
        idle driver), they are sent from here so their memory is freed. It
        also reads what arrived while no thread was waiting: a driver prints
        the error of a task nobody gets, and the node manager's output for a
        process busy elsewhere does not pile up (it would stop reading from
        it and, past a limit, drop it). Submissions held back to go
        together are sent from here if nothing else sent them soon.
        """
        while not self.closed:
            self.output_waiting.wait(BOOKKEEPING_DELAY_S)
            if self.gathered_messages or self.gathered:
                time.sleep(SUBMIT_GATHER_S)       # the rest of the run joins them
            self.output_waiting.clear()
            try:
                if self._has_bookkeeping() and not self.closed:
                    self._send_bookkeeping()
                if not self.closed:
                    self._poll_in_background()
            except RaySystemError:
                return

    def _poll_in_background(self):
        with self.cond:
            if self.reading:
                return
            self.reading = True
        try:
            for _ in range(BACKGROUND_READ_CHUNKS):
                if not self._receive(0):
                    break
        finally:
            self._done_reading()
        if self.pending_giveback or self.pending_fetch:
            self._send_bookkeeping()

    def _done_reading(self):
        """Give up reading the socket; wake the threads waiting to read."""
        with self.cond:
            self.reading = False
            # (notify_all is Python code, ~0.6 µs here, and most reads have
            # nobody waiting)
            if self.readers_waiting:
                self.cond.notify_all()

    def _has_bookkeeping(self):
        return bool(self.gathered or self.gathered_messages or self.pending_free
                    or self.pending_escape or self.pending_borrow or self.pending_giveback
                    or self.pending_output or self.pending_fetch)

    def _bookkeeping_frames(self):
        # Output first: what a task printed arrives before its result.
        # Escapes and borrows go before frees: a ref we now hold is counted
        # before anything that kept its object alive for us is let go.
        # What was held back goes first: it was sent before everything here.
        if self.gathered:
            frames, self.gathered = self.gathered, []
        else:
            frames = []
        if self.gathered_messages:
            frames.append(wire.encode(("batch", self.gathered_messages)))
            self.gathered_messages = []
        self.held_count = self.held_bytes = 0
        if self.pending_output:
            frames.extend(self._output_frames())
        if self.pending_giveback:
            given, self.pending_giveback = self.pending_giveback, []
            frames.append(wire.encode(("giveback", given)))
        if self.pending_fetch:
            fetch, self.pending_fetch = self.pending_fetch, []
            frames.append(wire.encode(("sub", fetch)))
        if self.pending_escape:
            escaped, self.pending_escape = self.pending_escape, []
            frames.append(wire.encode(("escape", escaped)))
        if self.pending_borrow:
            borrowed, self.pending_borrow = self.pending_borrow, []
            frames.append(wire.encode(("borrow", borrowed)))
        if self.pending_free:
            freed, self.pending_free = self.pending_free, {}
            frames.append(wire.encode(("free", list(freed))))
        return frames

    def queue_output(self, chunk):
        """Queue (job id, label, stream number, text) a worker's task printed."""
        size = len(chunk[3])
        with self.output_lock:
            if self.pending_output_chars + size > OUTPUT_PENDING_MAX:
                self.dropped_output_chars += size
                return
            self.pending_output.append(chunk)
            self.pending_output_chars += size
            much = self.pending_output_chars > OUTPUT_SEND_BYTES
        # Sent by the bookkeeping thread, never from here: the printing
        # thread may hold send_lock or be the one reading (minray reporting
        # something), and sending could then wait for itself.
        if much and not self.output_waiting.is_set():
            self.output_waiting.set()

    def _output_frames(self):
        frames, chunks, size = [], [], 0
        pending = self.pending_output
        while pending:
            chunk = pending.popleft()
            with self.output_lock:
                self.pending_output_chars -= len(chunk[3])
            if chunks and size + len(chunk[3]) > OUTPUT_MESSAGE_CHARS:
                frames.append(wire.encode(("output", chunks)))
                chunks, size = [], 0
            chunks.append(chunk)
            size += len(chunk[3])
        if self.dropped_output_chars and chunks:
            with self.output_lock:
                dropped, self.dropped_output_chars = self.dropped_output_chars, 0
            chunks.append((chunks[-1][0], chunks[-1][1], STDERR,
                           f"minray: {dropped} characters of output were dropped: printed "
                           "faster than they could be sent\n"))
        if chunks:
            frames.append(wire.encode(("output", chunks)))
        return frames

    # ------------------------------------------------------------ receiving
    def wait_until(self, predicate, timeout=None):
        """Process incoming messages until predicate() is true or time runs out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        polled = False
        if self.last_gathering_send:
            self.send_gathered()      # what we wait for may be among them
        while True:
            with self.cond:
                if predicate():
                    return True
                if (self.interrupt_requested
                        and threading.current_thread() is threading.main_thread()):
                    # minray.cancel of the task this worker runs: interrupt it
                    # here, between reads, where no message is half handled.
                    self.interrupt_requested = False
                    raise KeyboardInterrupt
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    if polled or self.reading:
                        return False
                    remaining = 0.0     # time is up, but read what already arrived
                polled = True
                if self.reading:
                    self.readers_waiting += 1
                    try:
                        self.cond.wait(remaining)
                    finally:
                        self.readers_waiting -= 1
                    continue
                self.reading = True
            try:
                self._receive(remaining)
            finally:
                self._done_reading()
            if self.pending_giveback or self.pending_fetch:
                self._send_bookkeeping()

    def _receive(self, timeout):
        """Read and handle what arrived (waiting up to timeout); True if anything did."""
        # The socket stays in blocking mode (another thread may be sending on
        # it); a timeout is waited for with poll, and a poll-less read uses
        # MSG_DONTWAIT.
        # Into a buffer kept for it: a fresh 1 MB bytes object per read would
        # cost an mmap, mremap and munmap each time (glibc's large blocks).
        view = self.recv_view
        try:
            if timeout is None:
                received = self.sock.recv_into(view)
            else:
                if timeout > 0 and not self.poller.poll(timeout * 1000):
                    return False
                received = self.sock.recv_into(view, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError as exc:
            self._lost(str(exc))
        if not received:
            self._lost("the node manager closed the connection")
        self.buffer += view[:received]
        for message, _ in wire.decode_frames(self.buffer):
            self._process(message)
        return True

    def _lost(self, why):
        self.closed = True
        raise RaySystemError(
            f"lost the connection to the node manager ({why}): the minray cluster is gone")

    def _take_object(self, object_id, value_kind, meta, payload):
        if value_kind == LOCATED:
            if object_id in self.ref_counts:
                self.located.add(object_id)
                if object_id in self.wanted and object_id not in self.subscribed:
                    # Sent once this read is done (the reader may hold send_lock).
                    self.subscribed.add(object_id)
                    self.pending_fetch.append(object_id)
        elif object_id in self.ref_counts or object_id in self.subscribed:
            if self.wanted:
                self.wanted.discard(object_id)
            self.objects[object_id] = (value_kind, meta, payload)
            if value_kind == ERROR:
                self.errors_arrived += 1
        elif self.dropped_pending.pop(object_id, False) and value_kind == ERROR:
            self._report_unhandled(meta, payload)

    def _process(self, message):
        kind = message[0]
        if kind == "objs":
            take = self._take_object
            for object_id, value_kind, meta, payload in message[1]:
                take(object_id, value_kind, meta, payload)
        elif kind == "obj":
            self._take_object(message[1], message[2], message[3], message[4])
        elif kind == "tasks":
            if self.lending and self.actor_id is None:
                # Sent before the node manager knew this worker had blocked:
                # hand them back, or they would wait behind the blocked task
                # (which may be waiting for them: a deadlock). Sent once this
                # read is done: the thread reading may hold send_lock.
                self.pending_giveback.extend(t[0] for t in message[1])
            else:
                self.tasks.extend(message[1])
        elif kind == "actor_init":
            self.tasks.append(message)
        elif kind == "cancel":
            if self.cancel_handler is not None:
                self.cancel_handler(message[1])
        elif kind == "output":
            print_output(message[1])
        elif kind == "error":
            print(f"minray: {message[1]}", file=sys.stderr, flush=True)
        elif kind == "path":
            for path in message[1]:
                if path not in sys.path:
                    sys.path.append(path)
        elif kind == "info":
            self.replies[message[1]] = message[2]
        elif kind == "failed":
            self.replies[message[1]] = RequestFailed(message[2])
        elif kind == "welcome":
            self.welcome = message[1]

    def request_info(self, what, timeout=30.0):
        request_id = next(self.request_ids)
        self.send(("info", request_id, what))
        return self._reply(request_id, timeout)

    def _reply(self, request_id, timeout):
        if not self.wait_until(lambda: request_id in self.replies, timeout):
            raise RaySystemError(f"the node manager did not answer within {timeout} s")
        reply = self.replies.pop(request_id)
        if isinstance(reply, RequestFailed):
            raise RaySystemError(f"the node manager could not handle the request: {reply}")
        return reply

    # ------------------------------------------------------------ references
    def own(self, object_ids):
        """Mark ids as this process's own, before their ObjectRefs are made."""
        self.owned.update(object_ids)

    def add_ref(self, object_id):
        """Count a live ObjectRef (or actor handle) for an object id."""
        count = self.ref_counts.get(object_id, 0)
        self.ref_counts[object_id] = count + 1
        if count == 0 and object_id not in self.owned and object_id not in self.borrowed:
            was_owned = self.pending_free.pop(object_id, None)
            if was_owned is not None:
                # Dropped and rebuilt before the "free" went out: take the
                # drop back (a borrow would reach the node manager before it).
                (self.owned if was_owned else self.borrowed).add(object_id)
                self.dropped_pending.pop(object_id, None)
                return
            # A ref we were handed (inside a value): hold its object for us.
            self.borrowed.add(object_id)
            self.pending_borrow.append(object_id)

    def remove_ref(self, object_id):
        count = self.ref_counts.get(object_id, 0) - 1
        if count > 0:
            self.ref_counts[object_id] = count
            return
        self.ref_counts.pop(object_id, None)
        value = self.objects.pop(object_id, None)
        self.subscribed.discard(object_id)
        if self.located:
            self.located.discard(object_id)
        if self.wanted:
            self.wanted.discard(object_id)
        owned = object_id in self.owned
        if owned:
            self.owned.discard(object_id)
            self.pending_free[object_id] = True
            if value is None:
                self.dropped_pending[object_id] = True
                if len(self.dropped_pending) > DROPPED_PENDING_MAX:
                    self.dropped_pending.popitem(last=False)
        elif object_id in self.borrowed:
            self.borrowed.discard(object_id)
            self.pending_free[object_id] = False
        if (owned and value is not None and value[0] == ERROR
                and object_id not in self.errors_raised):
            self._report_unhandled(value[1], value[2])
        self.errors_raised.discard(object_id)

    def _report_unhandled(self, meta, payload):
        """An error nobody raised with get: print it once, as Ray does."""
        try:
            error = deserialize(meta, payload)
        except Exception as exc:        # never let reporting break the caller
            error = f"(its error could not be read: {exc})"
        if isinstance(error, TaskCancelledError):
            return                      # cancelled on purpose (minray.cancel): no news
        print(f"minray: unhandled error: {error}", file=sys.stderr, flush=True)

    def escape(self, object_id):
        self.pending_escape.append(object_id)

    # ------------------------------------------------------------ tasks
    def next_task_id(self):
        if self.concurrent:      # several calls at once share no per-call counter
            return ids.child_task_id(self.actor_id, next(self.shared_counter))
        # next() of a count is atomic: threads of one driver never share an id.
        return ids.child_task_id(self.current_task_id, next(self.task_counter))

    def start_task(self, task_id):
        """Ids made from now on derive from this task (and restart counting)."""
        self.current_task_id = task_id
        self.task_counter = itertools.count()
        self.put_counter = itertools.count(1)

    def export_function(self, function_id, pickled, name):
        if function_id not in self.exported:
            self.send(("fn", function_id, pickled, name))
            self.exported.add(function_id)

    def submit(self, spec):
        self.send(("submit", spec), gather=True)

    # ------------------------------------------------------------ actors
    def create_actor(self, spec):
        """Ask for an actor; a named one waits for the name to be granted.

        Returns None, or with spec["get_if_exists"] the (actor_id,
        class_name, methods) of the actor that already has the name."""
        if spec["name"] is None:
            self.send(("actor_create", spec, 0))
            return None
        request_id = next(self.request_ids)
        self.send(("actor_create", spec, request_id))
        reply = self._reply(request_id, 30.0)
        if isinstance(reply, str):
            raise ValueError(reply)
        return reply

    def call_actor(self, spec):
        self.send(("actor_call", spec), gather=True)

    @property
    def namespace(self):
        """The namespace of this driver's job, or in a worker of the job of
        the task it runs (named actors are looked up and registered there)."""
        return self.namespace_info()[0]

    def namespace_info(self):
        """(namespace, whether it is an anonymous one)."""
        if self.role != "worker":
            return self.driver_namespace
        job_id = self.current_task_id[:ids.JOB_ID_SIZE]
        found = self.job_namespaces.get(job_id)
        if found is None:
            found = self.request_info(("namespace", job_id))
            if found is None:
                raise RaySystemError(
                    f"the node manager knows no namespace for job {job_id.hex()}: the "
                    "driver that started this work never said which one it uses")
            found = self.job_namespaces[job_id] = tuple(found)
        return found

    def close(self):
        if self.closed:
            return
        self.closed = True
        for object_id, (kind, meta, payload) in list(self.objects.items()):
            if kind == ERROR and object_id in self.owned and object_id not in self.errors_raised:
                self._report_unhandled(meta, payload)
        try:
            if (self.gathered or self.gathered_messages or self.pending_escape
                    or self.pending_free):
                with self.send_lock:
                    self._send_locked(b"".join(self._bookkeeping_frames()))
        except (OSError, RaySystemError):
            pass
        self.sock.close()
        if self.store is not None:
            self.store.close()


def _check_size(message, size):
    """A clear error here, rather than the node manager dropping us for it."""
    kind, limit = wire.message_limit(message, wire.NODE_MANAGER_MAX_FRAME,
                                     wire.ORDINARY_MAX_FRAME)
    if size > limit:
        raise ValueError(
            f"{kind!r} message of {size} bytes is over minray's {limit}-byte limit for it: "
            "send less at once (large values belong in minray.put() or in arguments, not "
            "in a function's or class's closure)")
