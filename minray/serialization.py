"""How values become bytes for the shared-memory object store, and back, zero-copy.

``serialize(value)`` returns a ``SerializedObject``: a short format tag
(``metadata``), the exact size of the data, and ``write_to(dest)``, which
writes the data straight into a 64-byte aligned slot of the object store.
``deserialize(metadata, data)`` turns the stored bytes back into a value.
numpy arrays, Arrow buffers and memoryviews in the result are read-only views
of ``data``. They hold a buffer export of ``data``'s exporter, so the object
store can keep the shared memory pinned for as long as any view lives.

Formats (the ``metadata`` tag)::

    RB  raw bytes: the data *is* the value               -> bytes (a copy)
    RA  raw bytearray, same layout                        -> bytearray (a copy)
    PK  one pickle stream (protocol 5), no out-of-band buffers
    P5  pickle protocol 5 with out-of-band buffers, laid out as
          header   magic "MRSO", u16 version, u16 0, u32 nbuf, u32 0,
                   u64 stream offset, u64 stream length       (32 bytes)
          table    nbuf x (u64 offset, u64 length)
          stream   the pickle stream
          buffers  each at a 64-byte aligned offset, zero padding between
    ND  one numpy array: the P5 layout with exactly one buffer (the array's
        data) and a stream that unpickles to (dtype, shape, order). This
        skips pickle's global lookups, which are most of the cost of a
        small array's round trip.
    AT  Arrow IPC stream holding a pyarrow.Table
    AB  Arrow IPC stream holding one pyarrow.RecordBatch

Integers are little-endian. Offsets are relative to the start of ``data``.
Values without a fast path are pickled with cloudpickle's Pickler, so
functions, lambdas, closures and classes from ``__main__`` or local scopes
travel by value.
"""
import functools
import io
import os
import pickle
import struct
import sys
import threading
import types
from pickle import PickleBuffer

import cloudpickle

# numpy is imported on first use, not here: processes that never touch an
# array (the node manager, an idle worker) start ~90 ms faster without it.
np = None


def _numpy():
    global np
    if np is None:
        import numpy
        np = numpy
    return np


def _is_ndarray_type(t):
    """True for numpy.ndarray, without importing numpy if nobody has."""
    if np is None:
        if "numpy" not in sys.modules:
            return False
        _numpy()
    return t is np.ndarray

from minray.exceptions import SerializationError

__all__ = [
    "SerializedObject",
    "serialize",
    "deserialize",
    "register_custom_serializer",
    "dumps",
    "loads",
]

META_BYTES = b"RB"
META_BYTEARRAY = b"RA"
META_PICKLE = b"PK"
META_PICKLE5 = b"P5"
META_NDARRAY = b"ND"
META_ARROW_TABLE = b"AT"
META_ARROW_BATCH = b"AB"

_PROTOCOL = 5
_ALIGN = 64
_MAGIC = b"MRSO"
_VERSION = 1
_HEADER = struct.Struct("<4sHHIIQQ")
_ENTRY = struct.Struct("<QQ")  # offset, length of one buffer
_ZEROS = bytes(_ALIGN)

# Types cloudpickle adds nothing for. The C pickler's one-shot pickle.dumps
# handles them several times faster than any Pickler object.
_PLAIN_TYPES = frozenset({int, float, bool, type(None), str, complex})


# ---------------------------------------------------------------------------
# Copying into the destination
# ---------------------------------------------------------------------------

# Below this size, memoryview slice assignment (a memcpy that holds the GIL) is
# cheapest. Above it we use np.copyto, which releases the GIL while copying.
_NUMPY_COPY_MIN = 256 << 10
# From this size the copy is split across threads. Measured on the 2-core dev
# box for 256 MB: one thread copies at ~7.4 GB/s into warm pages and ~1.1 GB/s
# into fresh /dev/shm pages; two threads reach ~14 GB/s and ~1.8 GB/s.
_PARALLEL_COPY_MIN = 64 << 20
_COPY_THREADS = min(2, os.cpu_count() or 1)
_copy_pool = None
_copy_pool_lock = threading.Lock()


def _reset_copy_pool():
    # A forked child inherits the pool object but not its threads.
    global _copy_pool
    _copy_pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_copy_pool)


def _get_copy_pool():
    global _copy_pool
    with _copy_pool_lock:
        if _copy_pool is None:
            from concurrent.futures import ThreadPoolExecutor

            _copy_pool = ThreadPoolExecutor(
                max_workers=_COPY_THREADS - 1, thread_name_prefix="minray-copy"
            )
        return _copy_pool


def _copy(dest, src):
    """Copy the bytes-like ``src`` into the byte memoryview ``dest`` (same length)."""
    n = len(src) if type(src) is bytes else memoryview(src).nbytes
    if n < _NUMPY_COPY_MIN:
        dest[:] = src
        return
    np = _numpy()
    d = np.frombuffer(dest, dtype=np.uint8)
    s = np.frombuffer(src, dtype=np.uint8)
    if n < _PARALLEL_COPY_MIN or _COPY_THREADS < 2:
        np.copyto(d, s)
        return
    # Page-aligned chunks; the calling thread copies the last one itself.
    chunk = (n // _COPY_THREADS) & ~4095
    pool = _get_copy_pool()
    futures = [
        pool.submit(np.copyto, d[i * chunk:(i + 1) * chunk], s[i * chunk:(i + 1) * chunk])
        for i in range(_COPY_THREADS - 1)
    ]
    start = (_COPY_THREADS - 1) * chunk
    np.copyto(d[start:], s[start:])
    for f in futures:
        f.result()


def _as_byte_view(buf):
    mv = buf if type(buf) is memoryview else memoryview(buf)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def _check_dest(dest, size):
    if type(dest) is not memoryview or dest.format != "B":
        dest = _as_byte_view(dest)
    if dest.readonly:
        raise ValueError("write_to needs a writable buffer")
    if dest.nbytes != size:
        raise ValueError(f"write_to needs a buffer of exactly {size} bytes, got {dest.nbytes}")
    return dest


# ---------------------------------------------------------------------------
# Serialized objects
# ---------------------------------------------------------------------------

class SerializedObject:
    """A value ready to be written: a ``metadata`` tag and ``total_size`` bytes."""

    __slots__ = ("metadata", "total_size")

    def write_to(self, dest):
        """Write exactly ``total_size`` bytes into the writable buffer ``dest``."""
        raise NotImplementedError


class _RawObject(SerializedObject):
    """The data is one bytes-like payload (formats RB, RA, PK)."""

    __slots__ = ("payload",)

    def __init__(self, metadata, payload):
        self.metadata = metadata
        self.payload = payload
        self.total_size = len(payload)

    def write_to(self, dest):
        _copy(_check_dest(dest, self.total_size), self.payload)


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
        if self.total_size >= _PARALLEL_COPY_MIN and _COPY_THREADS > 1:
            sink.set_memcopy_threads(_COPY_THREADS)
        _write_arrow_stream(pa, sink, self._value)
        if sink.tell() != self.total_size:
            raise SerializationError(
                f"the Arrow stream took {sink.tell()} bytes, expected {self.total_size}"
            )


def _write_arrow_stream(pa, sink, value):
    with pa.ipc.new_stream(sink, value.schema) as writer:
        writer.write(value)


# ---------------------------------------------------------------------------
# Reducers: numpy arrays out-of-band, memoryviews, exceptions
# ---------------------------------------------------------------------------

# Dtype kinds whose array data is plain bytes with no pointers: bool, ints,
# floats, complex, timedelta, datetime, fixed-size bytes and unicode, and
# void/structured.
_RAW_KINDS = frozenset("biufcmMSUV")


def _ndarray_parts(arr):
    """Return (flat uint8 view of the data, dtype, shape, order).

    Returns None when the data is not plain bytes (object dtypes, which
    numpy pickles in-band). Every other array goes out-of-band as one
    buffer. numpy's own reducer would instead copy non-contiguous arrays
    into the pickle stream, and also arrays whose dtype it cannot export
    through the buffer protocol (datetime64, some structured dtypes).
    """
    dtype = arr.dtype
    if dtype.hasobject or dtype.itemsize == 0 or dtype.kind not in _RAW_KINDS:
        return None
    if arr.flags.c_contiguous:
        order = "C"
    elif arr.flags.f_contiguous:
        order = "F"
    else:
        arr = np.ascontiguousarray(arr)
        order = "C"
    # This is a view, not a copy. A 0-d array cannot change its itemsize
    # without a reshape first.
    flat = (arr if arr.ndim == 1 else arr.reshape(-1, order=order)).view(np.uint8)
    # A simple dtype travels as its short string ("<f8", "<M8[D]"), because
    # pickling the dtype object itself costs several microseconds.
    if dtype.fields is None and dtype.subdtype is None and dtype.metadata is None:
        dtype = dtype.str
    return flat, dtype, arr.shape, order


def _reduce_ndarray(arr):
    parts = _ndarray_parts(arr)
    if parts is None:
        return NotImplemented  # numpy's own reducer, in-band
    flat, dtype, shape, order = parts
    return _rebuild_ndarray, (PickleBuffer(flat), dtype, shape, order)


def _rebuild_ndarray(buf, dtype, shape, order):
    # frombuffer makes ``buf`` (a read-only view of the stored data) the
    # array's base. The array is therefore read-only and keeps the data
    # pinned while it lives.
    arr = _numpy().frombuffer(buf, dtype=dtype)
    if len(shape) != 1:
        arr = arr.reshape(shape, order=order)
    return arr


def _reduce_memoryview(mv):
    fmt, shape = mv.format, mv.shape
    data = mv if mv.c_contiguous else mv.tobytes()
    return _rebuild_memoryview, (PickleBuffer(data), fmt, shape)


def _rebuild_memoryview(buf, fmt, shape):
    mv = _as_byte_view(buf)
    if fmt == "B" and len(shape) == 1:
        return mv
    try:
        return mv.cast(fmt, shape)
    except (TypeError, ValueError):
        return mv  # cast() cannot express this format, so return the raw bytes


def _reduce_exception(exc):
    # BaseException.__reduce__ rebuilds with cls(*self.args). That breaks for
    # classes whose __init__ takes different arguments from the ones it
    # passes to super().__init__, so rebuild without calling __init__.
    return _rebuild_exception, (type(exc), exc.args, exc.__dict__ or None)


def _rebuild_exception(cls, args, state):
    try:
        exc = cls.__new__(cls, *args)
    except TypeError:  # a __new__ with its own signature
        exc = BaseException.__new__(cls)
    exc.args = args
    if state:
        exc.__setstate__(state)
    return exc


def _uses_default_exception_reduce(cls):
    # Built-in exceptions round-trip already. Classes with their own
    # __reduce__ know best.
    return (cls.__module__ != "builtins"
            and cls.__reduce__ is BaseException.__reduce__
            and cls.__reduce_ex__ is object.__reduce_ex__)


# ---------------------------------------------------------------------------
# Custom serializers
# ---------------------------------------------------------------------------

_USE_PICKLE = object()
# exact class -> (serializer, deserializer), or _USE_PICKLE
_custom_serializers = {}
# The C pickler writes these itself and never asks reducer_override about them.
_ATOMIC_TYPES = frozenset({int, float, bool, type(None), str, bytes})


def register_custom_serializer(cls, serializer=None, deserializer=None, use_pickle=False,
                               use_dict=False, local=False):
    """Choose how instances of exactly ``cls`` (not its subclasses) are serialized.

    ``serializer(obj)`` must return something picklable, and
    ``deserializer(that)`` must rebuild the object from it. The deserializer
    is pickled by cloudpickle together with the data, so a process that
    never registered it can still deserialize. ``use_pickle=True`` means
    plain (cloud)pickle for the class, bypassing minray's own fast paths.
    ``use_dict=True`` (from the original Ray API) serializes the instance's
    ``__dict__`` and rebuilds it without calling ``__init__``. ``local`` is
    accepted for compatibility. Every registration is local to this process,
    and that is enough, because the deserializer travels with the data.
    """
    if not isinstance(cls, type):
        raise TypeError(
            "register_custom_serializer needs a class as its first argument, "
            f"got {type(cls).__name__} {cls!r}"
        )
    name = cls.__qualname__
    if use_pickle or use_dict:
        if serializer is not None or deserializer is not None or (use_pickle and use_dict):
            raise ValueError(
                f"register_custom_serializer({name}): pass exactly one of use_pickle=True, "
                "use_dict=True, or serializer= with deserializer="
            )
        if use_pickle:
            entry = _USE_PICKLE
        else:
            entry = (_instance_dict, functools.partial(_from_instance_dict, cls))
    else:
        if serializer is None and deserializer is None:
            raise ValueError(
                f"register_custom_serializer({name}): pass serializer= and "
                "deserializer= functions, or use_pickle=True"
            )
        if serializer is None or deserializer is None:
            missing = "serializer" if serializer is None else "deserializer"
            raise ValueError(
                f"register_custom_serializer({name}): {missing}= is missing; pass both "
                "serializer= and deserializer= (or use_pickle=True)"
            )
        for arg, fn in (("serializer", serializer), ("deserializer", deserializer)):
            if not callable(fn):
                raise TypeError(f"register_custom_serializer: {arg} must be callable, got {fn!r}")
        entry = (serializer, deserializer)
    if entry is not _USE_PICKLE and cls in _ATOMIC_TYPES:
        raise TypeError(f"register_custom_serializer: {name} is always pickled natively")
    _custom_serializers[cls] = entry
    _reducers.clear()


def _instance_dict(obj):
    try:
        return dict(vars(obj))
    except TypeError:
        raise TypeError(
            f"use_dict=True needs instances with a __dict__; {type(obj).__qualname__} has none"
        ) from None


def _from_instance_dict(cls, state):
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


# ---------------------------------------------------------------------------
# The pickler
# ---------------------------------------------------------------------------

# Cache of type -> reducer for _Pickler.reducer_override. A value is one of:
# a function returning a reduce tuple; None, meaning "pickle as usual"; or
# _CLOUDPICKLE, meaning cloudpickle's own reducer_override (classes and
# functions by value).
_CLOUDPICKLE = object()
_reducers = {}
_MAX_CACHED_TYPES = 4096


def _choose_reducer(t):
    if len(_reducers) > _MAX_CACHED_TYPES:
        _reducers.clear()  # don't pin an unbounded number of (local) classes
    entry = _custom_serializers.get(t)
    if entry is _USE_PICKLE:
        return _CLOUDPICKLE
    if entry is not None:
        serializer, deserializer = entry
        # The deserializer is itself the reconstructor, so it travels with
        # the data.
        return lambda obj: (deserializer, (serializer(obj),))
    if _is_ndarray_type(t):
        return _reduce_ndarray
    if t is memoryview:
        return _reduce_memoryview
    if issubclass(t, BaseException) and _uses_default_exception_reduce(t):
        return _reduce_exception
    if issubclass(t, type) or t is types.FunctionType:
        return _CLOUDPICKLE
    # For anything but classes and functions, cloudpickle's reducer_override
    # returns NotImplemented. Answering that here saves a Python call per
    # object.
    return None


class _Pickler(cloudpickle.Pickler):
    """cloudpickle's Pickler, with out-of-band buffers and minray's reducers.

    Each thread reuses one instance, because building a Pickler costs more
    than pickling a small value with it.
    """

    def __init__(self):
        self._file = io.BytesIO()
        self._buffers = []
        super().__init__(self._file, protocol=_PROTOCOL, buffer_callback=self._take_buffer)

    def _take_buffer(self, pb):
        try:
            self._buffers.append(pb.raw())
        except BufferError:
            return True  # a non-contiguous foreign buffer stays in-band
        return False

    def reducer_override(self, obj):
        # The C pickler calls this for every object that is not an int,
        # float, str, bytes, bool or None, so the per-type choice is cached.
        t = type(obj)
        try:
            reduce = _reducers[t]
        except KeyError:
            reduce = _reducers[t] = _choose_reducer(t)
        if reduce is None:
            return NotImplemented  # the usual way: copyreg, __reduce_ex__
        if reduce is _CLOUDPICKLE:
            return super().reducer_override(obj)
        return reduce(obj)

    def run(self, value):
        """Pickle ``value`` and return (stream, list of raw buffer memoryviews)."""
        f = self._file
        f.seek(0)
        f.truncate()
        self._buffers = buffers = []
        try:
            self.dump(value)
        finally:
            # Forget everything this value referenced (the memo and
            # cloudpickle's per-dump globals) so the next value starts clean.
            self.clear_memo()
            if hasattr(self, "globals_ref"):
                self.globals_ref = {}
            self._buffers = []
        return f.getvalue(), buffers


_local = threading.local()


def _pickle_value(value):
    # The pickler is taken out of the thread-local while in use, so nested
    # calls (e.g. a custom serializer that itself serializes) build their own.
    pickler = _local.__dict__.pop("pickler", None) or _Pickler()
    stream, buffers = pickler.run(value)  # on an error the pickler is dropped
    _local.pickler = pickler
    return stream, buffers


# ---------------------------------------------------------------------------
# serialize / deserialize
# ---------------------------------------------------------------------------

def serialize(value):
    """Turn ``value`` into a SerializedObject. Big buffers are not copied yet."""
    t = type(value)
    if t not in _custom_serializers:
        if t is bytes:
            return _RawObject(META_BYTES, value)
        if t in _PLAIN_TYPES:
            return _RawObject(META_PICKLE, pickle.dumps(value, _PROTOCOL))
        if _is_ndarray_type(t):
            parts = _ndarray_parts(value)
            if parts is not None:
                flat, dtype, shape, order = parts
                desc = pickle.dumps((dtype, shape, order), _PROTOCOL)
                return _Pickle5Object(desc, [memoryview(flat)], META_NDARRAY)
        elif t is bytearray:
            return _RawObject(META_BYTEARRAY, value)
        elif t.__module__ == "pyarrow.lib":
            import pyarrow as pa

            if t is pa.Table:
                return _ArrowObject(META_ARROW_TABLE, value, pa)
            if t is pa.RecordBatch:
                return _ArrowObject(META_ARROW_BATCH, value, pa)
    try:
        stream, buffers = _pickle_value(value)
    except SerializationError:
        raise
    except Exception as exc:
        raise _unserializable(value, exc) from exc
    if buffers:
        return _Pickle5Object(stream, buffers)
    return _RawObject(META_PICKLE, stream)


def deserialize(metadata, data):
    """Rebuild a value from its format tag and its stored bytes.

    Arrays, Arrow buffers and memoryviews in the result are read-only views
    of ``data``. Damaged data raises SerializationError.
    """
    if metadata == META_BYTES:
        return bytes(data)
    try:
        if metadata == META_PICKLE:
            return pickle.loads(data)
        if metadata == META_NDARRAY:
            return _loads_ndarray(data)
        if metadata == META_PICKLE5:
            return _loads_pickle5(data)
        if metadata == META_BYTEARRAY:
            return bytearray(data)
        if metadata == META_ARROW_TABLE or metadata == META_ARROW_BATCH:
            return _loads_arrow(metadata, data)
    except SerializationError:
        raise
    except Exception as exc:
        raise SerializationError(
            f"cannot deserialize object (format {bytes(metadata)!r}, {_nbytes(data)} bytes): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    raise SerializationError(f"unknown serialization format {bytes(metadata)!r}")


def _nbytes(data):
    try:
        return memoryview(data).nbytes
    except TypeError:
        return "?"


def _damaged(msg):
    return SerializationError(f"damaged serialized object: {msg}")


def _parse_layout(data):
    """Check the P5/ND header of ``data``.

    Returns (stream, buffers) as read-only memoryviews into ``data``.
    """
    mv = _as_byte_view(data)
    if not mv.readonly:
        mv = mv.toreadonly()  # the views we hand out must never write to the store
    size = mv.nbytes
    if size < _HEADER.size:
        raise _damaged(f"{size} bytes is shorter than the {_HEADER.size}-byte header")
    magic, version, _, nbuf, _, stream_off, stream_len = _HEADER.unpack_from(mv)
    if magic != _MAGIC:
        raise _damaged(f"bad magic {magic!r} (expected {_MAGIC!r})")
    if version != _VERSION:
        raise _damaged(f"unsupported format version {version} (this minray reads {_VERSION})")
    table_end = _HEADER.size + nbuf * _ENTRY.size
    if table_end > size:
        raise _damaged(f"the header claims {nbuf} buffers but the data is only {size} bytes")
    if stream_off != table_end:
        raise _damaged(
            f"the pickle stream starts at {stream_off}, not right after the {nbuf}-entry "
            f"buffer table at {table_end}"
        )
    end = stream_off + stream_len
    if end > size:
        raise _damaged(f"the pickle stream [{stream_off}, {end}) runs past the {size}-byte data")
    buffers = []
    for i in range(nbuf):
        off, length = _ENTRY.unpack_from(mv, _HEADER.size + i * _ENTRY.size)
        if off % _ALIGN or off < end or off + length > size:
            raise _damaged(
                f"buffer {i} at [{off}, {off + length}) is misaligned, overlaps what "
                f"precedes it or lies outside the {size}-byte data"
            )
        buffers.append(mv[off:off + length])
        end = off + length
    return mv[stream_off:stream_off + stream_len], buffers


def _loads_pickle5(data):
    stream, buffers = _parse_layout(data)
    it = iter(buffers)
    value = pickle.loads(stream, buffers=it)
    if next(it, None) is not None:
        raise _damaged(
            f"the pickle stream used fewer than the {len(buffers)} buffers in the header"
        )
    return value


def _loads_ndarray(data):
    stream, buffers = _parse_layout(data)
    if len(buffers) != 1:
        raise _damaged(f"a numpy array needs exactly 1 buffer, the header lists {len(buffers)}")
    desc = pickle.loads(stream)
    if type(desc) is not tuple or len(desc) != 3:
        raise _damaged("bad numpy array descriptor")
    dtype, shape, order = desc
    return _rebuild_ndarray(buffers[0], dtype, shape, order)


def _loads_arrow(metadata, data):
    import pyarrow as pa

    reader = pa.ipc.open_stream(pa.py_buffer(data))  # zero-copy over data
    if metadata == META_ARROW_TABLE:
        value = reader.read_all()
    else:
        value = reader.read_next_batch()
        try:
            reader.read_next_batch()
        except StopIteration:
            pass
        else:
            raise _damaged("an Arrow record batch stream holds more than one batch")
    value.validate()  # a cheap structural check: buffer sizes against lengths
    return value


# ---------------------------------------------------------------------------
# Bytes in, bytes out
# ---------------------------------------------------------------------------

# dumps() output: b"MR", the tag's length, the tag, zero padding to 16 bytes,
# then the data. The 16-byte prefix keeps arrays in loads() results as well
# aligned as the bytes object itself.
_DUMPS_PREFIX = 16


def dumps(value):
    """Serialize ``value`` into one bytes object (for sending over sockets)."""
    so = serialize(value)
    meta = so.metadata
    prefix = b"MR" + bytes((len(meta),)) + meta + bytes(_DUMPS_PREFIX - 3 - len(meta))
    if type(so) is _RawObject:
        return prefix + so.payload
    out = bytearray(_DUMPS_PREFIX + so.total_size)
    out[:_DUMPS_PREFIX] = prefix
    so.write_to(memoryview(out)[_DUMPS_PREFIX:])
    return bytes(out)


def loads(b):
    """Inverse of dumps(). Arrays in the result are read-only views of ``b``."""
    mv = _as_byte_view(b)
    if mv.nbytes < _DUMPS_PREFIX or mv[:2] != b"MR" or mv[2] > _DUMPS_PREFIX - 3:
        raise SerializationError("not the output of minray.serialization.dumps() (bad prefix)")
    meta = bytes(mv[3:3 + mv[2]])
    return deserialize(meta, mv[_DUMPS_PREFIX:].toreadonly())


# ---------------------------------------------------------------------------
# Error messages for values that cannot be serialized
# ---------------------------------------------------------------------------
# Only runs after pickling has failed. It searches the value for the
# innermost part that fails on its own, so the message can name it and say
# where it sits.

_MAX_SEARCH_DEPTH = 20
_MAX_CHILDREN = 10000


def _type_name(t):
    mod = getattr(t, "__module__", None)
    qual = getattr(t, "__qualname__", t.__name__)
    return qual if mod in (None, "builtins") else f"{mod}.{qual}"


def _short_repr(x):
    try:
        r = repr(x)
    except Exception:
        r = f"<{_type_name(type(x))}>"
    return r if len(r) <= 40 else r[:37] + "..."


def _pickle_error(obj):
    try:
        _Pickler().run(obj)
    except Exception as exc:
        return exc
    return None


def _children(obj):
    """Yield (label, child) pairs worth descending into to locate a failure."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield f"dict key {_short_repr(k)} (the key itself)", k
            yield f"dict key {_short_repr(k)}", v
    elif isinstance(obj, (list, tuple)):
        kind = "tuple" if isinstance(obj, tuple) else "list"
        for i, v in enumerate(obj):
            yield f"{kind} index {i}", v
    elif isinstance(obj, (set, frozenset)):
        for v in obj:
            yield "set element", v
    elif isinstance(obj, types.FunctionType):
        code, name = obj.__code__, obj.__qualname__
        for var, cell in zip(code.co_freevars, obj.__closure__ or ()):
            try:
                yield f"{name} closure variable {var!r}", cell.cell_contents
            except ValueError:  # an empty cell
                pass
        for var in code.co_names:
            if var in obj.__globals__:
                yield f"{name} global {var!r}", obj.__globals__[var]
    elif not isinstance(obj, type):
        cls_name = type(obj).__qualname__
        attrs = getattr(obj, "__dict__", None)
        if isinstance(attrs, dict):
            for k, v in attrs.items():
                yield f"{cls_name}.{k}", v
        for klass in type(obj).__mro__:
            slots = klass.__dict__.get("__slots__", ())
            for slot in (slots,) if isinstance(slots, str) else slots:
                if slot not in ("__dict__", "__weakref__") and hasattr(obj, slot):
                    yield f"{cls_name}.{slot}", getattr(obj, slot)


def _locate(obj, path, depth, error):
    """Return the innermost (path, object, error) inside ``obj`` that fails to pickle."""
    if depth < _MAX_SEARCH_DEPTH and type(obj) not in _custom_serializers:
        try:
            for count, (label, child) in enumerate(_children(obj)):
                if count >= _MAX_CHILDREN:
                    break
                child_error = _pickle_error(child)
                if child_error is not None:
                    return _locate(child, path + (label,), depth + 1, child_error)
        except Exception:  # an odd object; report what we have
            pass
    return path, obj, error


def _unserializable(value, exc):
    try:
        path, culprit, cause = _locate(value, (), 0, exc)
    except RecursionError:
        path, culprit, cause = (), value, exc
    where = " -> ".join(path) + ": " if path else ""
    return SerializationError(
        f"{where}cannot serialize object of type {_type_name(type(culprit))} "
        f"({type(cause).__name__}: {cause}). Make it picklable (e.g. define __reduce__ or "
        "__getstate__/__setstate__), or register a custom serializer for its class with "
        f"minray.register_custom_serializer({type(culprit).__qualname__}, serializer=..., "
        "deserializer=...)."
    )
