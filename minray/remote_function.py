"""@minray.remote on a function: RemoteFunction and its options."""
import hashlib
import numbers
import warnings

from minray.serialization.code import dumps_code

from minray.exceptions import SerializationError
from minray.resources import check_amount
from minray.runtime import core
from minray.runtime.object_ref import ObjectRef, serialize_with_refs
from minray.runtime_context import current_task
from minray.signatures import CallSignature

TASK_OPTIONS = {
    "num_returns": "how many ObjectRefs .remote() returns (alias num_return_vals)",
    "num_return_vals": "the original docs' name for num_returns",
    "num_cpus": "CPUs the task holds while it runs (default 1)",
    "num_gpus": "GPUs the task holds; their ids are in minray.get_gpu_ids()",
    "resources": "custom resources, e.g. {'memory_bank': 1}",
    "memory": "bytes of the node's memory resource the task reserves while it runs",
    "max_retries": "times a task is re-run if its worker dies (default 3)",
    "max_calls": "its worker exits after running it this many times (default: no limit, "
                 "1 for GPU tasks); only in @minray.remote",
    "name": "a name for the task in the state API",
}
DEFAULT_MAX_RETRIES = 3
# Pickled functions and actor classes, as Ray's limits: a warning above 10 MB,
# an error above 100 MB (the message frame itself could carry up to 1 GiB).
CODE_SIZE_WARN_BYTES = 10 ** 7
CODE_SIZE_ERROR_BYTES = 10 ** 8


def _bad_option(name, valid):
    options = ", ".join(sorted(valid))
    return ValueError(f"unknown option {name!r}; valid options are: {options}")


def check_option_type(name, value, types, expected):
    """TypeError (as Ray raises) when an option's value has the wrong type;
    bools are not numbers here. Values of the right type but out of range are
    ValueErrors, raised by the callers."""
    if isinstance(value, bool) or not isinstance(value, types):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r:.60}")


def check_num_returns(value, name="num_returns"):
    if isinstance(value, str) and value in ("dynamic", "streaming"):
        raise ValueError(f"{name}={value!r} (generators returning refs one by one) is not "
                         "supported by minray; return a list, or use num_returns=N")
    check_option_type(name, value, int, "an int >= 0")
    if value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def check_count(name, value, minimum, what):
    """An int option: TypeError if it is not an int, ValueError below minimum."""
    check_option_type(name, value, int, what)
    if value < minimum:
        raise ValueError(f"{name} must be {what}, got {value!r}")


def validate_resources(options):
    """Check num_cpus / num_gpus / resources; return the resource dict."""
    num_cpus = options.get("num_cpus", 1)
    num_gpus = options.get("num_gpus", 0)
    memory = options.get("memory") or 0
    custom = options.get("resources") or {}
    for name, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus), ("memory", memory)):
        check_option_type(name, value, numbers.Real, "a number >= 0")
        check_amount(name, value)
    if not isinstance(custom, dict):
        raise TypeError(f"resources must be a dict of name -> amount, got {custom!r:.60}")
    for name, value in custom.items():
        if not isinstance(name, str):
            raise TypeError(f"resource names are strings, got {name!r}")
        if name in ("CPU", "GPU"):
            raise ValueError(f"use num_cpus / num_gpus instead of resources={{'{name}': ...}}")
        if name == "memory":
            raise ValueError("use the memory=... option (bytes) instead of "
                             "resources={'memory': ...}")
        check_option_type(f"resource {name!r}", value, numbers.Real, "a number >= 0")
        check_amount(f"resource {name!r}", value)
    if num_gpus and num_gpus != int(num_gpus) and num_gpus > 1:
        raise ValueError(f"num_gpus above 1 must be a whole number, got {num_gpus}")
    resources = {"CPU": float(num_cpus), "GPU": float(num_gpus), "memory": float(memory)}
    resources.update({k: float(v) for k, v in custom.items()})
    return {k: v for k, v in resources.items() if v}


def validate_task_options(options, in_options=False):
    for name in options:
        if name not in TASK_OPTIONS:
            raise _bad_option(name, TASK_OPTIONS)
    if "max_calls" in options:
        max_calls = options["max_calls"]
        if in_options:
            # As in Ray: a worker counts calls per function, not per .options().
            raise ValueError("max_calls can only be set in @minray.remote(...), "
                             "not in .options()")
        check_count("max_calls", max_calls, 0, "an int >= 0 (0: no limit)")
    if "num_return_vals" in options:
        check_num_returns(options["num_return_vals"], "num_return_vals")
        options = dict(options)
        options.setdefault("num_returns", options.pop("num_return_vals"))
    check_num_returns(options.get("num_returns", 1))
    check_count("max_retries", options.get("max_retries", DEFAULT_MAX_RETRIES), -1,
                "an int >= 0 (or -1 for unlimited)")
    if "name" in options:
        check_option_type("name", options["name"], str, "a str")
    validate_resources(options)
    return options


def check_code_size(pickled, kind, name, stacklevel):
    """Refuse code whose pickle is too big to ship; warn when it is big.

    Such a pickle nearly always means the function or class captured a large
    object from its scope (an array, a model), which would be sent to every
    worker that runs it.
    """
    size = len(pickled)
    if size > CODE_SIZE_ERROR_BYTES:
        raise ValueError(
            f"{kind} {name} is too large to ship: it pickles to {size:,} bytes, over minray's "
            f"limit of {CODE_SIZE_ERROR_BYTES:,} bytes (100 MB). It probably captures a "
            "large object from its scope (a global or closure variable): put that object "
            "in the object store with minray.put() and pass the ref as an argument instead")
    if size > CODE_SIZE_WARN_BYTES:
        warnings.warn(
            f"{kind} {name} pickles to {size / 1e6:.1f} MB and is sent to every worker that "
            "runs it; if it captures a large object, pass it with minray.put() instead",
            RuntimeWarning, stacklevel=stacklevel)


def encode_args(client, function_name, args, kwargs):
    """Task arguments: refs stay refs, small values inline, large ones put first.

    Returns (entries, kwarg names, ids of refs inside inline values, refs to
    keep alive until the spec is sent).
    """
    entries = []
    contained = []
    keep_alive = []
    for position, value in enumerate(list(args) + list(kwargs.values())):
        if isinstance(value, ObjectRef):
            entries.append(("r", value.binary()))
            continue
        try:
            serialized, inner = serialize_with_refs(value)
        except SerializationError as exc:
            where = (f"argument {position}" if position < len(args)
                     else f"keyword argument {list(kwargs)[position - len(args)]!r}")
            raise SerializationError(f"{where} of {function_name}: {exc}") from None
        if serialized.total_size <= core.INLINE_MAX_BYTES:
            entries.append(("v", serialized.metadata, serialized.to_bytes()))
            contained.extend(inner)
        else:
            object_id = client.next_put_id()
            client.own([object_id])
            keep_alive.append(ObjectRef(object_id))
            client.put_serialized(object_id, serialized, inner)
            entries.append(("r", object_id))
    return entries, tuple(kwargs), contained, keep_alive


def returns_of(return_ids):
    refs = [ObjectRef(object_id) for object_id in return_ids]
    if len(refs) == 1:
        return refs[0]
    return refs if refs else None


class RemoteFunction:
    def __init__(self, function, options):
        self._function = function
        self._options = validate_task_options(options)
        self._resources = validate_resources(self._options)   # once, not per call
        # As in Ray, a GPU function's worker exits after each call unless told
        # otherwise, so the GPU memory it took is given back.
        self._max_calls = self._options.get("max_calls")
        if self._max_calls is None:
            self._max_calls = 1 if self._options.get("num_gpus") else 0
        self._name = getattr(function, "__qualname__", getattr(function, "__name__", "task"))
        self._pickled = None
        self._function_id = None
        # Read once: .remote() checks each call against it (None: unchecked).
        signature = CallSignature.of(function)
        self._signature = None if signature is None or signature.free else signature
        self.__doc__ = function.__doc__
        self.__name__ = getattr(function, "__name__", "task")
        self._call_name = f"{self.__name__}.remote()"
        self.__wrapped__ = function

    def __call__(self, *args, **kwargs):
        raise TypeError(
            f"remote function {self._name} cannot be called directly; "
            f"use {self.__name__}.remote(...) to run it as a task")

    def options(self, **options):
        merged = dict(self._options)
        merged.update(validate_task_options(options, in_options=True))
        return _BoundOptions(self, merged, validate_resources(merged))

    def remote(self, *args, **kwargs):
        return self._submit(args, kwargs, self._options, self._resources)

    def _export(self, client):
        if self._pickled is None:
            try:
                pickled = dumps_code(self._function)
            except Exception as exc:
                raise SerializationError(
                    f"remote function {self._name} cannot be pickled: {exc}") from None
            check_code_size(pickled, "remote function", self._name, stacklevel=5)
            self._pickled = pickled
            self._function_id = hashlib.blake2b(pickled, digest_size=16).digest()
        client.export_function(self._function_id, self._pickled, self._name)

    def _submit(self, args, kwargs, options, resources):
        from minray import api
        if self._signature is not None:
            self._signature.check(args, kwargs, self._call_name)
        client = api.ensure_initialized()
        self._export(client)
        num_returns = options.get("num_returns", 1)
        entries, kwarg_names, contained, keep_alive = encode_args(
            client, self._name, args, kwargs)
        task_id = client.next_task_id()
        return_ids = [task_id + (i).to_bytes(4, "big") for i in range(1, num_returns + 1)]
        client.own(return_ids)
        refs = returns_of(return_ids)
        # The fields of minray.protocol.TaskSpec, as a plain tuple.
        spec = (task_id, self._function_id, options.get("name", self._name), entries,
                kwarg_names, num_returns, resources,
                options.get("max_retries", DEFAULT_MAX_RETRIES), contained, self._max_calls,
                current_task.get() or client.current_task_id)
        client.submit(spec)
        del keep_alive
        return refs


class _BoundOptions:
    def __init__(self, remote_function, options, resources):
        self._remote_function = remote_function
        self._options = options
        self._resources = resources

    def remote(self, *args, **kwargs):
        return self._remote_function._submit(args, kwargs, self._options, self._resources)
