"""How values become bytes for the shared-memory object store, and back, zero-copy.

``serialize(value)`` returns a ``SerializedObject``: a short format tag
(``metadata``), the exact size of the data, and ``write_to(dest)``, which
writes the data straight into a 64-byte aligned slot of the object store.
``deserialize(metadata, data)`` turns the stored bytes back into a value.
numpy arrays, Arrow buffers and memoryviews in the result are read-only views
of ``data``. They hold a buffer export of ``data``'s exporter, so the object
store can keep the shared memory pinned for as long as any view lives.
Values without a fast path are pickled with cloudpickle's Pickler, so
functions, lambdas, closures and classes from ``__main__`` or local scopes
travel by value.  The stored formats are described in layout.py.

The modules of this package:

    layout      the format tags and the P5 layout, with its validating parser
    objects     SerializedObject and its kinds (raw, P5, Arrow)
    copying     copying big buffers into the destination, on a thread pool
    reducers    numpy/memoryview/exception reducers and the pickler
    custom      register_custom_serializer's registry
    errors      finding the part of a value that cannot be serialized
    lazy        numpy, imported on first use
"""
import pickle

from minray.exceptions import SerializationError

# Some names are imported only to be found here, where they were before the
# split: the registry and the reducer cache (tests reset them), the copy
# module (tests tune it) and the reconstructors that pickle streams name.
from . import copying  # noqa: F401
from .custom import (
    _custom_serializers, _from_instance_dict, _reducers, register_custom_serializer,  # noqa: F401
)
from .errors import _unserializable
from .layout import (
    _PROTOCOL, META_ARROW_BATCH, META_ARROW_TABLE, META_BYTEARRAY, META_BYTES, META_NDARRAY,
    META_PICKLE, META_PICKLE5, _as_byte_view, _damaged, _parse_layout,
)
from .lazy import _is_ndarray_type
from .objects import _ArrowObject, _Pickle5Object, _RawObject, SerializedObject
from .reducers import (
    _ndarray_parts, _pickle_value, _rebuild_exception, _rebuild_memoryview, _rebuild_ndarray,
)

__all__ = [
    "SerializedObject",
    "serialize",
    "deserialize",
    "register_custom_serializer",
    "dumps",
    "loads",
]

# Types cloudpickle adds nothing for. The C pickler's one-shot pickle.dumps
# handles them several times faster than any Pickler object.
_PLAIN_TYPES = frozenset({int, float, bool, type(None), str, complex})


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
# Keeping the package's names what they were in the single module
# ---------------------------------------------------------------------------

# Pickle streams name these reconstructors by module and name. They keep the
# name minray.serialization.<function> they had before this package was
# split, so the streams (and what older readers expect) stay byte for byte
# the same.
for _f in (_rebuild_ndarray, _rebuild_memoryview, _rebuild_exception, _from_instance_dict):
    _f.__module__ = __name__
del _f

