"""register_custom_serializer: the per-process registry of custom serializers."""
import functools

_USE_PICKLE = object()
# exact class -> (serializer, deserializer), or _USE_PICKLE
_custom_serializers = {}
# The C pickler writes these itself and never asks reducer_override about them.
_ATOMIC_TYPES = frozenset({int, float, bool, type(None), str, bytes})
# The pickler's cache of type -> reducer (see reducers._choose_reducer). What
# it holds depends on the registrations, so every registration clears it.
_reducers = {}


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
