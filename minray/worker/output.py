"""What a worker's tasks print, sent to the driver of the job that ran them.

sys.stdout and sys.stderr of a worker are replaced by streams that hand
complete lines to the worker's client, tagged with the job of the task that
printed them and a label (the task's function or the actor's class). The
client sends them ahead of its next message (so a task's output reaches the
node manager before its result) or within BOOKKEEPING_DELAY_S; the node
manager routes them to the job's driver (minray.node_manager.output).

Output written below Python (C extensions, subprocesses) goes to the
worker's file descriptors: the driver's terminal for a cluster started by
init(), the worker's log file on a node started with `minray start`.
"""
import os
import threading

from minray import ids
from minray.protocol import STDERR, STDOUT
from minray.runtime_context import current_task

PIECE_CHARS = 64 * 1024           # the most text in one queued piece, or one partial line


class OutputForwarder:
    """Tags and queues what the worker's tasks print."""

    def __init__(self, client):
        self.client = client
        self.label = "worker"         # the running task's function, or the actor's class

    def queue(self, stream_no, text):
        if self.client is None:             # (a forked child's copy)
            return
        task_id = current_task.get() or self.client.current_task_id
        job_id = task_id[:ids.JOB_ID_SIZE]
        for start in range(0, len(text), PIECE_CHARS):
            self.client.queue_output((job_id, self.label, stream_no,
                                      text[start:start + PIECE_CHARS]))


class ForwardedStream:
    """A text stream whose complete lines go to the forwarder; a partial
    line waits for its end, a flush() or the end of the task.

    copy_to, when given, also gets everything written, prefixed with the pid
    (the worker's log file on a node whose workers do not share the
    driver's terminal). Attributes it lacks (fileno, encoding, ...) are the
    original stream's.
    """

    def __init__(self, forwarder, stream_no, original, copy_to=None):
        self.forwarder = forwarder
        self.stream_no = stream_no
        self.original = original
        self.copy_to = copy_to
        self.partial = ""
        self.lock = threading.Lock()       # tasks' threads print too

    def write(self, text):
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if not text:
            return 0
        if self.copy_to is not None:
            self.copy_to.write(text)
        with self.lock:
            end = text.rfind("\n")
            if end < 0:
                self.partial += text
                if len(self.partial) < PIECE_CHARS:
                    return len(text)
                end = len(text) - 1       # a line that never ends (progress bars): send it
            complete = self.partial + text[:end + 1]
            self.partial = text[end + 1:]
        self.forwarder.queue(self.stream_no, complete)
        return len(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        with self.lock:
            partial, self.partial = self.partial, ""
        if partial:
            self.forwarder.queue(self.stream_no, partial)
        if self.copy_to is not None:
            self.copy_to.flush()

    def isatty(self):
        return False

    def __getattr__(self, name):
        return getattr(self.original, name)


class PrefixedStream:
    """Prefixes every line written with the worker's pid (for its log file)."""

    def __init__(self, stream):
        self.stream = stream
        self.prefix = f"(pid={os.getpid()}) "
        self.at_line_start = True

    def write(self, text):
        lines = text.split("\n")
        out = []
        for i, line in enumerate(lines):
            if line and self.at_line_start:
                out.append(self.prefix)
            out.append(line)
            if i < len(lines) - 1:
                out.append("\n")
                self.at_line_start = True
            elif line:
                self.at_line_start = False
        self.stream.write("".join(out))
        self.stream.flush()
        return len(text)

    def flush(self):
        self.stream.flush()


def forward_output(client, copy_to_files):
    """Replace sys.stdout and sys.stderr with forwarded streams."""
    import sys
    forwarder = OutputForwarder(client)
    streams = []
    for stream_no, original in ((STDOUT, sys.stdout), (STDERR, sys.stderr)):
        copy_to = PrefixedStream(original) if copy_to_files else None
        streams.append(ForwardedStream(forwarder, stream_no, original, copy_to))
    sys.stdout, sys.stderr = streams
    # A process forked by a task (multiprocessing) shares our socket but not
    # our threads: it prints to the original streams instead.
    os.register_at_fork(after_in_child=lambda: _restore(streams))
    return forwarder, streams


def _restore(streams):
    import sys
    if sys.stdout is streams[0]:
        sys.stdout = streams[0].original
    if sys.stderr is streams[1]:
        sys.stderr = streams[1].original
    for stream in streams:
        stream.forwarder.client = None
