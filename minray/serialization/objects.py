"""SerializedObject: a value ready to be written, and its kinds per format."""
import abc

from minray.exceptions import SerializationError

from . import copying
from .copying import _check_dest, _copy
from .layout import _ALIGN, _ENTRY, _HEADER, _MAGIC, _VERSION, _ZEROS, META_PICKLE5


class SerializedObject(abc.ABC):
    """A value ready to be written: a ``metadata`` tag and ``total_size`` bytes."""

    __slots__ = ("metadata", "total_size")

    @abc.abstractmethod
    def write_to(self, dest):
        """Write exactly ``total_size`` bytes into the writable buffer ``dest``."""

    def to_bytes(self):
        """The data as one bytes object (for values small enough to travel inline)."""
        buf = bytearray(self.total_size)
        self.write_to(memoryview(buf))
        return bytes(buf)


class _RawObject(SerializedObject):
    """The data is one bytes-like payload (formats RB, RA, PK)."""

    __slots__ = ("payload",)

    def __init__(self, metadata, payload):
        self.metadata = metadata
        self.payload = payload
        self.total_size = len(payload)

    def write_to(self, dest):
        _copy(_check_dest(dest, self.total_size), self.payload)

    def to_bytes(self):
        # bytes values and pickle streams are already the data: no copy.
        return self.payload if type(self.payload) is bytes else bytes(self.payload)


class _Pickle5Object(SerializedObject):
    """A pickle stream and out-of-band buffers in the P5 layout (formats P5, ND)."""

    __slots__ = ("_head", "_stream", "_buffers", "_offsets")

    def __init__(self, stream, buffers, metadata=META_PICKLE5):
        nbuf = len(buffers)
        stream_off = _HEADER.size + nbuf * _ENTRY.size
        pos = stream_off + len(stream)
        head = [_HEADER.pack(_MAGIC, _VERSION, 0, nbuf, 0, stream_off, len(stream))]
        offsets = []
        for buf in buffers:
            pos = (pos + _ALIGN - 1) & ~(_ALIGN - 1)
            offsets.append(pos)
            head.append(_ENTRY.pack(pos, buf.nbytes))
            pos += buf.nbytes
        self._head = b"".join(head)
        self._stream = stream
        self._buffers = buffers
        self._offsets = offsets
        self.metadata = metadata
        self.total_size = pos

    def write_to(self, dest):
        dest = _check_dest(dest, self.total_size)
        pos = len(self._head)
        dest[:pos] = self._head
        end = pos + len(self._stream)
        dest[pos:end] = self._stream
        for off, buf in zip(self._offsets, self._buffers):
            # Zero the padding so what is written never depends on what the
            # arena held before.
            dest[end:off] = _ZEROS[:off - end]
            end = off + buf.nbytes
            _copy(dest[off:end], buf)


class _ArrowObject(SerializedObject):
    """A pyarrow Table or RecordBatch as an Arrow IPC stream (formats AT, AB)."""

    __slots__ = ("_value",)

    def __init__(self, metadata, value, pa):
        # To learn the size, write once to a stream that only counts bytes.
        # This copies nothing.
        sink = pa.MockOutputStream()
        _write_arrow_stream(pa, sink, value)
        self.metadata = metadata
        self._value = value
        self.total_size = sink.size()

    def write_to(self, dest):
        import pyarrow as pa

        dest = _check_dest(dest, self.total_size)
        sink = pa.FixedSizeBufferWriter(pa.py_buffer(dest))
        if self.total_size >= copying._PARALLEL_COPY_MIN and copying._COPY_THREADS > 1:
            sink.set_memcopy_threads(copying._COPY_THREADS)
        _write_arrow_stream(pa, sink, self._value)
        if sink.tell() != self.total_size:
            raise SerializationError(
                f"the Arrow stream took {sink.tell()} bytes, expected {self.total_size}"
            )


def _write_arrow_stream(pa, sink, value):
    with pa.ipc.new_stream(sink, value.schema) as writer:
        writer.write(value)
