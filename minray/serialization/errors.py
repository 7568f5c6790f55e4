"""Error messages for values that cannot be serialized.

Only runs after pickling has failed. It searches the value for the innermost
part that fails on its own, so the message can name it and say where it sits.
"""
import types

from minray.exceptions import SerializationError

from .custom import _custom_serializers
from .reducers import _Pickler

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
