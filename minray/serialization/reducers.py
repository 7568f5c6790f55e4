"""Reducers (numpy arrays out-of-band, memoryviews, exceptions) and the pickler."""
import io
import threading
import types
from pickle import PickleBuffer

from .code import CodePickler

from .custom import _USE_PICKLE, _custom_serializers, _reducers
from .layout import _PROTOCOL, _as_byte_view
from .lazy import _is_ndarray_type, _numpy

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
    np = _numpy()
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
# The pickler
# ---------------------------------------------------------------------------

# _reducers (custom.py) caches type -> reducer for _Pickler.reducer_override.
# A value is one of: a function returning a reduce tuple; None, meaning
# "pickle as usual"; or _CLOUDPICKLE, meaning cloudpickle's own
# reducer_override (classes and functions by value).
_CLOUDPICKLE = object()
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


class _Pickler(CodePickler):
    """cloudpickle's Pickler (code keeps its file names), with out-of-band buffers and minray's reducers.

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
