"""Tests of minray.serialization, with a bytearray standing in for the arena."""
import collections
import dataclasses
import datetime
import fractions
import gc
import math
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pyarrow as pa
import pytest

from minray import serialization
from minray.exceptions import RayError, SerializationError
from minray.serialization import (
    SerializedObject,
    deserialize,
    dumps,
    loads,
    register_custom_serializer,
    serialize,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def address(buf):
    """Address of the first byte of a buffer-protocol object."""
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data if memoryview(buf).nbytes else 0


class Arena:
    """One serialized object written the way the object store writes it."""

    def __init__(self, value):
        self.so = serialize(value)
        assert isinstance(self.so, SerializedObject)
        self.raw = bytearray(self.so.total_size + 64)
        skip = (-address(self.raw)) % 64
        self.dest = memoryview(self.raw)[skip:skip + self.so.total_size]
        assert address(self.dest) % 64 == 0 or self.so.total_size == 0
        self.so.write_to(self.dest)
        self.data = self.dest.toreadonly()
        self.lo = address(self.dest) if self.so.total_size else 0
        self.hi = self.lo + self.so.total_size

    def load(self):
        return deserialize(self.so.metadata, self.data)

    def contains(self, addr, nbytes=0):
        return self.lo <= addr and addr + nbytes <= self.hi


def roundtrip(value):
    return Arena(value).load()


def check_array(arr, out):
    assert type(out) is np.ndarray
    assert out.dtype == arr.dtype
    assert out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


@pytest.fixture
def clean_registry():
    saved = dict(serialization._custom_serializers)
    yield
    serialization._custom_serializers.clear()
    serialization._custom_serializers.update(saved)
    serialization._reducers.clear()


# --------------------------------------------------------------------------
# module-level types used by the round-trip tests
# --------------------------------------------------------------------------

Point = collections.namedtuple("Point", ["x", "y"])


@dataclasses.dataclass
class Record:
    name: str
    values: list
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class FrozenRecord:
    key: int


class Plain:
    def __init__(self, a, b):
        self.a = a
        self.b = b

    def __eq__(self, other):
        return type(other) is Plain and (self.a, self.b) == (other.a, other.b)


class Slotted:
    __slots__ = ("x", "y")

    def __init__(self, x, y):
        self.x, self.y = x, y


class CodeError(Exception):
    """Takes more constructor arguments than it passes to Exception."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


class KeywordOnlyError(ValueError):
    def __init__(self, *, reason):
        super().__init__(f"failed: {reason}")
        self.reason = reason


class Color:
    pass


# --------------------------------------------------------------------------
# scalars, strings, bytes
# --------------------------------------------------------------------------

@pytest.mark.parametrize("value", [
    0, 1, -1, 2 ** 63, -(2 ** 200), 10 ** 1000, 1.5, -0.0, float("inf"), 1e-300,
    True, False, None, 3 + 4j, "", "plain", "héllo wörld ☃ 𝄞 日本語", "\x00nul",
    "x" * 100_000, b"", b"\x00\xff" * 10, b"b" * 1024, b"big" * 1_000_000,
])
def test_scalar_roundtrip(value):
    out = roundtrip(value)
    assert type(out) is type(value)
    assert out == value
    if isinstance(value, float):
        assert math.copysign(1, out) == math.copysign(1, value)


def test_nan_roundtrip():
    assert math.isnan(roundtrip(float("nan")))


def test_bytes_fast_path_is_raw():
    a = Arena(b"abc" * 100)
    assert a.so.metadata == b"RB"
    assert a.so.total_size == 300
    assert bytes(a.data) == b"abc" * 100


def test_bytearray_roundtrip_is_mutable_copy():
    value = bytearray(b"mutable")
    a = Arena(value)
    out = a.load()
    assert type(out) is bytearray and out == value
    out[0] = ord("M")
    assert bytes(a.data) == b"mutable"


def test_memoryview_roundtrip_is_zero_copy():
    arr = np.arange(12, dtype=np.float64).reshape(3, 4)
    a = Arena({"view": memoryview(arr)})
    out = a.load()["view"]
    assert isinstance(out, memoryview)
    assert out.readonly
    assert out.format == "d" and out.shape == (3, 4)
    assert out.tolist() == arr.tolist()
    assert a.contains(address(out), out.nbytes)


def test_plain_values_are_not_pickled_by_cloudpickle(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("cloudpickle's Pickler used for a plain value")

    monkeypatch.setattr(serialization, "_pickle_value", boom)
    for value in (1, 2.5, "s", None, True, b"x", bytearray(b"y"), np.arange(3)):
        out = roundtrip(value)
        assert type(out) is type(value)


# --------------------------------------------------------------------------
# containers and user types
# --------------------------------------------------------------------------

def test_nested_containers():
    value = {
        "list": [1, 2.0, "three", [4, [5, (6,)]]],
        "tuple": (None, True, b"bytes"),
        "set": {1, 2, 3},
        "frozenset": frozenset({"a", "b"}),
        (1, 2): {"nested": {"deeper": [{}]}},
        "empty": ([], (), {}, set(), ""),
    }
    out = roundtrip(value)
    assert out == value
    assert type(out["set"]) is set and type(out["frozenset"]) is frozenset


def test_shared_references_are_kept():
    shared = [1, 2, 3]
    out = roundtrip({"a": shared, "b": shared})
    assert out["a"] is out["b"]


def test_self_referencing_list():
    value = [1]
    value.append(value)
    out = roundtrip(value)
    assert out[0] == 1 and out[1] is out


def test_stdlib_types():
    value = [
        datetime.datetime(2020, 5, 17, 12, 30, tzinfo=datetime.timezone.utc),
        datetime.timedelta(days=3),
        fractions.Fraction(3, 7),
        collections.OrderedDict(a=1, b=2),
        collections.Counter("hello"),
        range(3, 30, 3),
    ]
    assert roundtrip(value) == value


def test_namedtuple_and_dataclasses():
    value = [Point(1, 2), Record("r", [1, 2], 0.5), FrozenRecord(7)]
    out = roundtrip(value)
    assert out == value
    assert type(out[0]) is Point and out[0].y == 2
    assert type(out[1]) is Record


def test_custom_class_instances():
    value = Plain(Plain(1, [2]), {"k": "v"})
    out = roundtrip(value)
    assert out == value and out is not value
    slotted = roundtrip(Slotted(3, "four"))
    assert (slotted.x, slotted.y) == (3, "four")


def test_exception_with_extra_constructor_args():
    out = roundtrip(CodeError(42, "bad thing"))
    assert type(out) is CodeError
    assert out.code == 42
    assert out.args == ("bad thing",)
    assert str(out) == "bad thing"


def test_exception_with_keyword_only_constructor():
    out = roundtrip(KeywordOnlyError(reason="disk full"))
    assert type(out) is KeywordOnlyError
    assert out.reason == "disk full"
    assert str(out) == "failed: disk full"
    assert isinstance(out, ValueError)


def test_builtin_exceptions():
    values = [ValueError("v"), KeyError("k"), OSError(2, "No such file", "/x"),
              StopIteration(5), SerializationError("s")]
    out = roundtrip(values)
    assert [type(e) for e in out] == [type(e) for e in values]
    assert [e.args for e in out] == [e.args for e in values]
    assert out[2].errno == 2 and out[2].filename == "/x"
    assert out[3].value == 5


def test_locally_defined_exception_class():
    class LocalError(RuntimeError):
        def __init__(self, a, b):
            super().__init__(f"{a}/{b}")
            self.a, self.b = a, b

    out = roundtrip(LocalError(1, 2))
    assert type(out).__name__ == "LocalError"
    assert isinstance(out, RuntimeError)
    assert (out.a, out.b, str(out)) == (1, 2, "1/2")


def test_class_objects_and_enum_like_values():
    out = roundtrip([Color, Plain, int, np.float32])
    assert out == [Color, Plain, int, np.float32]


# --------------------------------------------------------------------------
# functions, lambdas, closures, local classes
# --------------------------------------------------------------------------

GLOBAL_FACTOR = 3


def module_function(x):
    return x * GLOBAL_FACTOR


def test_lambda():
    f = roundtrip(lambda x, y=2: x ** y)
    assert f(3) == 9 and f(2, 3) == 8


def test_closure():
    def make_counter(start):
        count = [start]

        def step(by=1):
            count[0] += by
            return count[0]
        return step

    f = roundtrip(make_counter(10))
    assert f() == 11 and f(5) == 16


def test_module_function():
    assert roundtrip(module_function)(2) == 6


def test_nested_function_and_recursion():
    def fib(n):
        return n if n < 2 else fib(n - 1) + fib(n - 2)

    assert roundtrip(fib)(10) == 55


def test_local_class_and_instance():
    class Local:
        def __init__(self, v):
            self.v = v

        def double(self):
            return self.v * 2

    out_cls, out_obj = roundtrip([Local, Local(21)])
    assert out_obj.double() == 42
    assert isinstance(out_obj, out_cls)
    assert out_cls(4).double() == 8


def test_functions_that_capture_arrays():
    weights = np.arange(5.0)
    f = roundtrip(lambda x: float(weights @ x))
    assert f(np.ones(5)) == 10.0


# --------------------------------------------------------------------------
# numpy
# --------------------------------------------------------------------------

DTYPES = [
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
    np.uint64, np.float16, np.float32, np.float64, np.longdouble, np.complex64,
    np.complex128, ">i4", "<f8", "datetime64[ns]", "datetime64[D]", "timedelta64[s]",
    "S5", "U7", "V6",
]


def make_array(dtype, shape=(4, 5)):
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    if dtype.kind in "mM":
        arr = np.arange(n).astype(dtype)
    elif dtype.kind == "S":
        arr = np.array([b"ab%d" % i for i in range(n)], dtype=dtype)
    elif dtype.kind == "U":
        arr = np.array(["ü%d☃" % i for i in range(n)], dtype=dtype)
    elif dtype.kind == "V":
        arr = np.frombuffer(bytes(i % 251 for i in range(n * dtype.itemsize)), dtype=dtype).copy()
    else:
        arr = (np.arange(n) % 7).astype(dtype)
    return arr.reshape(shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_array_dtypes_zero_copy_read_only(dtype):
    arr = make_array(dtype)
    a = Arena(arr)
    out = a.load()
    check_array(arr, out)
    assert not out.flags.writeable
    assert a.contains(out.ctypes.data, out.nbytes), "array data must lie inside the buffer"
    assert out.ctypes.data % 64 == 0
    with pytest.raises(ValueError):
        out[0, 0] = out[0, 1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nested_array_dtypes_out_of_band(dtype):
    arr = make_array(dtype, (50, 3))
    a = Arena({"arr": arr, "other": [1, 2]})
    assert a.so.metadata == b"P5"
    out = a.load()["arr"]
    check_array(arr, out)
    assert not out.flags.writeable
    assert a.contains(out.ctypes.data, out.nbytes)
    assert out.ctypes.data % 64 == 0


def test_structured_dtype():
    dt = np.dtype([("id", "<i8"), ("pos", "<f4", (3,)), ("name", "S8")], align=True)
    arr = np.zeros(10, dtype=dt)
    arr["id"] = np.arange(10)
    arr["pos"] = np.arange(30).reshape(10, 3)
    arr["name"] = [b"n%d" % i for i in range(10)]
    for value in (arr, [arr]):
        a = Arena(value)
        out = a.load()
        out = out[0] if isinstance(value, list) else out
        assert out.dtype == dt
        np.testing.assert_array_equal(out, arr)
        assert a.contains(out.ctypes.data, out.nbytes)


def test_subarray_and_metadata_dtypes():
    sub = np.zeros((4,), dtype=("<i4", (2, 2)))
    meta = np.arange(3, dtype=np.dtype("f8", metadata={"unit": "m"}))
    out_sub, out_meta = roundtrip(sub), roundtrip(meta)
    assert out_sub.shape == sub.shape == (4, 2, 2)
    assert out_meta.dtype.metadata == {"unit": "m"}
    np.testing.assert_array_equal(out_meta, meta)


def test_zero_d_and_empty_arrays():
    for arr in (np.array(3.5), np.array(7, dtype=np.int8), np.zeros(0), np.zeros((0, 4)),
                np.zeros((3, 0), order="F"), np.array([], dtype="U3")):
        out = roundtrip(arr)
        check_array(arr, out)
        assert not out.flags.writeable
    scalar = roundtrip(np.array(2.5))
    assert scalar.shape == () and scalar[()] == 2.5


def test_non_contiguous_arrays_go_out_of_band():
    base = np.arange(4000.0).reshape(40, 100)
    for arr in (base[::2, ::3], base[:, 5], base[::-1], base.T[::2]):
        assert not (arr.flags.c_contiguous or arr.flags.f_contiguous)
        for value in (arr, {"nested": arr}):
            a = Arena(value)
            out = a.load()
            out = out["nested"] if isinstance(value, dict) else out
            check_array(arr, out)
            assert a.contains(out.ctypes.data, out.nbytes)
            # The data is in the buffer once, not also in the pickle stream.
            assert a.so.total_size < arr.nbytes + 512


def test_fortran_order_is_kept():
    arr = np.asfortranarray(np.arange(60, dtype=np.int32).reshape(3, 4, 5))
    a = Arena(arr)
    out = a.load()
    check_array(arr, out)
    assert out.flags.f_contiguous and not out.flags.c_contiguous
    assert a.contains(out.ctypes.data, out.nbytes)
    transposed = roundtrip(np.arange(6.0).reshape(2, 3).T)
    assert transposed.flags.f_contiguous
    np.testing.assert_array_equal(transposed, [[0, 3], [1, 4], [2, 5]])


def test_large_array_written_once():
    arr = np.random.default_rng(0).random((1000, 1000))
    a = Arena(arr)
    assert a.so.metadata == b"ND"
    assert arr.nbytes <= a.so.total_size < arr.nbytes + 256
    out = a.load()
    assert np.array_equal(out, arr)
    assert out.base is not None
    assert a.contains(out.ctypes.data, out.nbytes)


def test_many_arrays_in_one_object_are_aligned():
    arrays = [np.full(n, n % 256, dtype=np.uint8) for n in (1, 3, 63, 64, 65, 1000)]
    a = Arena(arrays)
    out = a.load()
    for arr, got in zip(arrays, out):
        check_array(arr, got)
        assert got.ctypes.data % 64 == 0
        assert a.contains(got.ctypes.data, got.nbytes)


def test_object_arrays_in_band():
    arr = np.array([1, "two", None, [3], {"four": 4}, lambda: 5], dtype=object)
    out = roundtrip(arr)
    assert out.dtype == object and len(out) == 6
    assert list(out[:5]) == [1, "two", None, [3], {"four": 4}]
    assert out[5]() == 5
    assert roundtrip(np.array([[1, 2], [3, 4]], dtype=object)).shape == (2, 2)


def test_array_subclasses_and_numpy_scalars():
    masked = np.ma.masked_array([1, 2, 3], mask=[0, 1, 0])
    out = roundtrip([masked, np.float32(1.5), np.int64(-3), np.datetime64("2020-01-01")])
    assert isinstance(out[0], np.ma.MaskedArray) and out[0].mask.tolist() == [False, True, False]
    assert out[1] == np.float32(1.5) and type(out[1]) is np.float32
    assert out[2] == -3 and out[3] == np.datetime64("2020-01-01")


def test_array_views_keep_data_alive():
    a = Arena({"x": np.arange(1000)})
    out = a.load()["x"]
    del a
    gc.collect()
    assert int(out.sum()) == 999 * 1000 // 2


@pytest.mark.parametrize("kind", ["ndarray", "nested ndarray", "arrow", "memoryview"])
def test_views_hold_a_buffer_export_of_the_data(kind):
    # The object store keeps an object pinned while its buffer is exported. A
    # bytearray shows the same thing: it cannot be resized while any export
    # of it is held.
    value, pick = {
        "ndarray": (np.arange(100), lambda out: out),
        "nested ndarray": ({"a": [np.ones(10)]}, lambda out: out["a"][0]),
        "arrow": (pa.table({"ints": np.arange(100)}), lambda out: out.column("ints")),
        "memoryview": ([memoryview(b"abc" * 30)], lambda out: out[0]),
    }[kind]
    a = Arena(value)
    view = pick(a.load())
    raw = a.raw
    del a
    gc.collect()
    with pytest.raises(BufferError):
        raw.extend(b"x")  # still exported, through `view`
    del view
    gc.collect()
    raw.extend(b"x")  # every export is gone


def test_parallel_copy_path(monkeypatch):
    monkeypatch.setattr(serialization.copying, "_PARALLEL_COPY_MIN", 1 << 20)
    monkeypatch.setattr(serialization.copying, "_COPY_THREADS", 2)
    arr = np.random.default_rng(1).integers(0, 255, (3 << 20) + 17, dtype=np.uint8)
    out = roundtrip(arr)
    assert np.array_equal(out, arr)
    out = roundtrip(b"q" * ((2 << 20) + 5))
    assert out == b"q" * ((2 << 20) + 5)


# --------------------------------------------------------------------------
# Arrow
# --------------------------------------------------------------------------

def sample_table(n=1000):
    return pa.table({
        "ints": pa.array(np.arange(n, dtype=np.int64)),
        "floats": pa.array(np.linspace(0, 1, n)),
        "strings": pa.array([f"s{i}" for i in range(n)]),
        "nullable": pa.array([None if i % 3 == 0 else i for i in range(n)]),
    })


def arrow_buffers(value):
    columns = value.columns
    for col in columns:
        for chunk in getattr(col, "chunks", [col]):
            for buf in chunk.buffers():
                if buf is not None and buf.size:
                    yield buf


def test_arrow_table_zero_copy():
    table = sample_table()
    a = Arena(table)
    assert a.so.metadata == b"AT"
    out = a.load()
    assert isinstance(out, pa.Table)
    assert out.equals(table)
    bufs = list(arrow_buffers(out))
    assert bufs
    for buf in bufs:
        assert a.contains(buf.address, buf.size), "Arrow column buffer copied out of the store"
        assert not buf.is_mutable


def test_arrow_record_batch_zero_copy():
    batch = sample_table(100).to_batches()[0]
    a = Arena(batch)
    assert a.so.metadata == b"AB"
    out = a.load()
    assert isinstance(out, pa.RecordBatch)
    assert out.equals(batch)
    for buf in arrow_buffers(out):
        assert a.contains(buf.address, buf.size)


def test_arrow_empty_and_chunked_tables():
    empty = pa.table({"a": pa.array([], type=pa.int32())})
    assert roundtrip(empty).equals(empty)
    chunked = pa.concat_tables([sample_table(10), sample_table(20)])
    out = roundtrip(chunked)
    assert out.equals(chunked) and out.num_rows == 30


def test_arrow_nested_in_container():
    table = sample_table(500)
    a = Arena({"table": table, "array": pa.array([1, 2, 3])})
    out = a.load()
    assert out["table"].equals(table)
    assert out["array"].to_pylist() == [1, 2, 3]
    ints = out["table"].column("ints").chunks[0].buffers()[1]
    assert a.contains(ints.address, ints.size)


# --------------------------------------------------------------------------
# custom serializers
# --------------------------------------------------------------------------

class Connection:
    """Holds a lock and a socket: plain pickle cannot handle it."""

    def __init__(self, host, port):
        self.host, self.port = host, port
        self.lock = threading.Lock()
        self.sock = socket.socket()

    def close(self):
        self.sock.close()


def test_custom_serializer_for_unpicklable_class(clean_registry):
    conn = Connection("example", 80)
    try:
        with pytest.raises(SerializationError):
            serialize(conn)
        register_custom_serializer(
            Connection,
            serializer=lambda c: (c.host, c.port),
            deserializer=lambda state: Connection(*state),
        )
        out = roundtrip({"conn": conn, "list": [conn]})
        try:
            assert type(out["conn"]) is Connection
            assert (out["conn"].host, out["conn"].port) == ("example", 80)
            assert out["list"][0] is out["conn"]
            assert out["conn"].lock is not conn.lock
        finally:
            out["conn"].close()
    finally:
        conn.close()


def test_custom_serializer_applies_to_exact_class_only(clean_registry):
    class Base:
        def __init__(self, v):
            self.v = v

    class Derived(Base):
        pass

    register_custom_serializer(Base, serializer=lambda b: b.v * 10,
                               deserializer=lambda s: Base(s + 1))
    assert roundtrip(Base(1)).v == 11
    derived = roundtrip(Derived(1))
    assert type(derived).__name__ == "Derived" and derived.v == 1


def test_custom_serializer_overrides_fast_paths(clean_registry):
    register_custom_serializer(np.ndarray, serializer=lambda a: a.tolist(),
                               deserializer=lambda lst: ("custom", lst))
    assert roundtrip(np.arange(3)) == ("custom", [0, 1, 2])
    assert roundtrip([np.arange(2)]) == [("custom", [0, 1])]


def test_use_pickle_replaces_a_custom_serializer(clean_registry):
    register_custom_serializer(Plain, serializer=lambda p: 0, deserializer=lambda s: "custom")
    assert roundtrip(Plain(1, 2)) == "custom"
    register_custom_serializer(Plain, use_pickle=True)
    assert roundtrip(Plain(1, 2)) == Plain(1, 2)


def test_use_dict_skips_init(clean_registry):
    class NeedsArgs:
        def __init__(self, required):
            self.required = required
            self.lock = threading.Lock()

        def __reduce__(self):
            raise TypeError("not picklable on purpose")

    obj = NeedsArgs(5)
    del obj.lock
    with pytest.raises(SerializationError):
        serialize(obj)
    register_custom_serializer(NeedsArgs, use_dict=True, local=True)
    out = roundtrip([obj])[0]
    assert type(out).__name__ == "NeedsArgs" and out.required == 5
    assert not hasattr(out, "lock")


def test_custom_serializer_that_serializes_again(clean_registry):
    # Reentrancy: a serializer that itself calls serialize/dumps.
    register_custom_serializer(Color, serializer=lambda c: dumps({"inner": [1, 2]}),
                               deserializer=lambda b: loads(b))
    assert roundtrip([Color(), 5]) == [{"inner": [1, 2]}, 5]


def test_custom_serializer_error_is_reported(clean_registry):
    def bad(obj):
        raise RuntimeError("serializer exploded")

    register_custom_serializer(Color, serializer=bad, deserializer=lambda s: s)
    with pytest.raises(SerializationError, match="serializer exploded") as info:
        serialize({"c": Color()})
    assert "Color" in str(info.value)


@pytest.mark.parametrize("args, kwargs, exc, words", [
    ((Color(),), {"use_pickle": True}, TypeError, "class"),
    (("Color",), {"use_pickle": True}, TypeError, "class"),
    ((Color,), {}, ValueError, "serializer= and deserializer="),
    ((Color,), {"serializer": repr}, ValueError, "deserializer= is missing"),
    ((Color,), {"deserializer": repr}, ValueError, "serializer= is missing"),
    ((Color,), {"serializer": repr, "deserializer": repr, "use_pickle": True}, ValueError,
     "exactly one of"),
    ((Color,), {"use_pickle": True, "use_dict": True}, ValueError, "exactly one of"),
    ((Color,), {"use_dict": True, "serializer": repr}, ValueError, "exactly one of"),
    ((Color,), {"serializer": "nope", "deserializer": repr}, TypeError, "callable"),
    ((int,), {"serializer": repr, "deserializer": int}, TypeError, "natively"),
])
def test_register_custom_serializer_validates(clean_registry, args, kwargs, exc, words):
    with pytest.raises(exc, match=words):
        register_custom_serializer(*args, **kwargs)
    assert Color not in serialization._custom_serializers


def test_custom_deserializer_travels_to_a_fresh_process(clean_registry, tmp_path):
    # Everything is defined locally, so cloudpickle carries the class and the
    # deserializer by value; the child process never registers anything.
    class Guarded:
        def __init__(self, name, items):
            self.name, self.items = name, items
            self.lock = threading.Lock()

    def rebuild(state):
        name, items = state
        obj = Guarded(name, items)
        obj.rebuilt_by = "custom deserializer"
        return obj

    register_custom_serializer(Guarded, serializer=lambda g: (g.name, g.items),
                               deserializer=rebuild)
    path = tmp_path / "payload.bin"
    path.write_bytes(dumps({"g": Guarded("alpha", [1, 2, 3]), "arr": np.arange(4)}))
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {REPO!r})
        from minray import serialization
        assert not serialization._custom_serializers
        value = serialization.loads(open({str(path)!r}, "rb").read())
        g = value["g"]
        print(type(g).__name__, g.name, g.items, g.rebuilt_by, type(g.lock).__name__,
              value["arr"].tolist())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["Guarded", "alpha", "[1,", "2,", "3]", "custom",
                                   "deserializer", "lock", "[0,", "1,", "2,", "3]"]


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------

def test_unserializable_top_level():
    with pytest.raises(SerializationError) as info:
        serialize(threading.Lock())
    msg = str(info.value)
    assert "_thread.lock" in msg
    assert "register_custom_serializer" in msg
    assert isinstance(info.value, TypeError) and isinstance(info.value, RayError)


def test_unserializable_path_in_containers():
    value = {"ok": 1, "x": [0, 1, threading.Lock()]}
    with pytest.raises(SerializationError) as info:
        serialize(value)
    assert "dict key 'x' -> list index 2: cannot serialize object of type _thread.lock" \
        in str(info.value)


def test_unserializable_attribute_path():
    obj = Plain(1, {"sock": socket.socket()})
    try:
        with pytest.raises(SerializationError) as info:
            serialize([obj])
        msg = str(info.value)
        assert "list index 0 -> Plain.b -> dict key 'sock'" in msg
        assert "socket.socket" in msg
    finally:
        obj.b["sock"].close()


def test_unserializable_closure_variable():
    lock = threading.Lock()

    def uses_lock():
        with lock:
            return 1

    with pytest.raises(SerializationError) as info:
        serialize(uses_lock)
    assert "closure variable 'lock'" in str(info.value)
    assert "_thread.lock" in str(info.value)


def test_unserializable_generator():
    with pytest.raises(SerializationError, match="generator"):
        serialize((i for i in range(3)))


def test_serializer_still_works_after_an_error():
    with pytest.raises(SerializationError):
        serialize([threading.Lock()])
    assert roundtrip({"after": [1, 2]}) == {"after": [1, 2]}


def test_unserializable_deep_recursion_is_an_error():
    value = []
    for _ in range(100_000):
        value = [value]
    with pytest.raises(SerializationError):
        serialize(value)


# --------------------------------------------------------------------------
# damaged data
# --------------------------------------------------------------------------

def damaged(value, mutate):
    a = Arena(value)
    raw = bytearray(a.dest)
    mutate(raw)
    return a.so.metadata, memoryview(bytes(raw))


P5_VALUE = {"a": np.arange(100), "b": np.ones((3, 3))}


@pytest.mark.parametrize("mutate, words", [
    (lambda r: r.__setitem__(slice(0, 4), b"XXXX"), "bad magic"),
    (lambda r: struct.pack_into("<H", r, 4, 99), "unsupported format version 99"),
    (lambda r: struct.pack_into("<I", r, 8, 10 ** 9), "claims 1000000000 buffers"),
    (lambda r: struct.pack_into("<I", r, 8, 1), "buffer table"),
    (lambda r: struct.pack_into("<Q", r, 24, 10 ** 12), "pickle stream"),
    (lambda r: struct.pack_into("<Q", r, 16, 3), "pickle stream"),
    (lambda r: struct.pack_into("<Q", r, 32, 10 ** 12), "buffer 0"),
    (lambda r: struct.pack_into("<Q", r, 40, 10 ** 12), "buffer 0"),
    (lambda r: struct.pack_into("<Q", r, 32, 65), "buffer 0"),
    (lambda r: struct.pack_into("<Q", r, 48, 0), "buffer 1"),
])
def test_damaged_header(mutate, words):
    meta, data = damaged(P5_VALUE, mutate)
    assert meta == b"P5"
    with pytest.raises(SerializationError, match=words):
        deserialize(meta, data)


def test_unused_buffers_are_detected():
    so = serialize({"a": np.arange(10)})
    extra = memoryview(b"unreferenced")
    forged = serialization._Pickle5Object(so._stream, so._buffers + [extra])
    a_dest = memoryview(bytearray(forged.total_size))
    forged.write_to(a_dest)
    with pytest.raises(SerializationError, match="fewer than the 2 buffers"):
        deserialize(b"P5", a_dest.toreadonly())


@pytest.mark.parametrize("cut", [0, 10, 31, 40, 100])
def test_truncated_data(cut):
    a = Arena(P5_VALUE)
    with pytest.raises(SerializationError):
        deserialize(a.so.metadata, a.data[:cut])


def test_truncated_ndarray_buffer():
    a = Arena(np.arange(100))
    with pytest.raises(SerializationError):
        deserialize(b"ND", a.data[:-8])


def test_damaged_pickle_stream():
    a = Arena({"k": [1, 2, 3]})
    assert a.so.metadata == b"PK"
    with pytest.raises(SerializationError, match="cannot deserialize"):
        deserialize(b"PK", a.data[: len(a.data) // 2])
    with pytest.raises(SerializationError):
        deserialize(b"PK", b"\x80\x05garbage")


def test_damaged_arrow_stream():
    a = Arena(sample_table(50))
    with pytest.raises(SerializationError):
        deserialize(b"AT", a.data[: len(a.data) // 2])
    with pytest.raises(SerializationError):
        deserialize(b"AB", b"\x00" * 64)


def test_unknown_format_tag():
    with pytest.raises(SerializationError, match="unknown serialization format"):
        deserialize(b"ZZ", b"data")


def test_loads_rejects_garbage():
    for junk in (b"", b"short", b"XX" + bytes(30), b"MR\xff" + bytes(30)):
        with pytest.raises(SerializationError):
            loads(junk)


def test_write_to_checks_destination():
    so = serialize(np.arange(10))
    with pytest.raises(ValueError, match="exactly"):
        so.write_to(memoryview(bytearray(so.total_size + 1)))
    with pytest.raises(ValueError, match="writable"):
        so.write_to(memoryview(bytes(so.total_size)))


# --------------------------------------------------------------------------
# format details, dumps/loads, threads
# --------------------------------------------------------------------------

def test_total_size_is_exact_and_padding_zeroed():
    value = {"a": np.arange(7, dtype=np.int8), "b": np.arange(3.0)}
    so = serialize(value)
    raw = bytearray(b"\xee" * (so.total_size + 128))
    skip = (-address(raw)) % 64
    so.write_to(memoryview(raw)[skip:skip + so.total_size])
    assert raw[:skip] == b"\xee" * skip
    assert raw[skip + so.total_size:] == b"\xee" * (len(raw) - skip - so.total_size)
    assert b"\xee" not in raw[skip:skip + so.total_size]


def test_serialize_is_deterministic():
    value = {"x": [1, 2, np.arange(5)], "y": "text"}
    assert dumps(value) == dumps(value)


def test_dumps_loads():
    value = {"arr": np.arange(10.0), "table": sample_table(10), "f": lambda: 1,
             "b": b"\x00" * 10, "n": None}
    blob = dumps(value)
    assert type(blob) is bytes
    out = loads(blob)
    np.testing.assert_array_equal(out["arr"], value["arr"])
    assert not out["arr"].flags.writeable
    assert out["table"].equals(value["table"])
    assert out["f"]() == 1 and out["b"] == value["b"] and out["n"] is None
    for value in (b"raw", 5, "s", np.arange(3), sample_table(3), bytearray(b"ba")):
        out = loads(dumps(value))
        assert type(out) is type(value)
    assert loads(bytearray(dumps([1, 2]))) == [1, 2]


def test_writable_input_still_gives_read_only_arrays():
    so = serialize([np.arange(4)])
    buf = bytearray(so.total_size)
    so.write_to(memoryview(buf))
    out = deserialize(so.metadata, buf)[0]
    assert not out.flags.writeable


def test_concurrent_serialization_from_threads():
    errors = []

    def work(i):
        try:
            for j in range(200):
                value = {"i": i, "j": j, "arr": np.full(10, i), "f": (lambda k=i: k)}
                out = roundtrip(value)
                assert out["i"] == i and out["j"] == j and out["f"]() == i
                assert out["arr"].tolist() == [i] * 10
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
