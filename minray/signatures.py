"""Checking a call's arguments against the signature of the function, actor
constructor or actor method it is for, at `.remote()`, as Ray does: a call
that could never bind raises TypeError where it was made, not later from get.

`.remote()` is a hot path, so a signature is read once (inspect.signature)
and reduced to what binding needs; a call with positional arguments only is
checked by counting them, and one that cannot fail (a function taking only
*args and **kwargs) is not checked at all. inspect's Signature.bind runs only
for keyword arguments, where it also writes the error message.

A CallSignature travels with actor handles as its compact `params` tuple, so
a handle passed to a task or found with get_actor checks calls too.
"""
import inspect

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class _Default:
    """Stands for a parameter's default value, which is not kept."""

    def __repr__(self):
        return "..."


_DEFAULT = _Default()
_cache = {}            # params tuple -> CallSignature, shared by every handle


class CallSignature:
    """The parameters of a callable: (name, kind, has_default) for each."""

    __slots__ = ("params", "free", "_min_positional", "_max_positional", "_signature")

    def __init__(self, params):
        self.params = params = tuple(tuple(p) for p in params)
        kinds = [kind for _, kind, _ in params]
        positional = [p for p in params if p[1] in _POSITIONAL]
        required_keyword = any(kind == inspect.Parameter.KEYWORD_ONLY and not has_default
                               for _, kind, has_default in params)
        has_var_positional = inspect.Parameter.VAR_POSITIONAL in kinds
        # Every call binds: only *args, **kwargs and parameters with defaults
        # that cannot be named twice (positional-only or keyword-only).
        self.free = (has_var_positional and inspect.Parameter.VAR_KEYWORD in kinds
                     and all(has_default or kind in (inspect.Parameter.VAR_POSITIONAL,
                                                     inspect.Parameter.VAR_KEYWORD)
                             for _, kind, has_default in params)
                     and inspect.Parameter.POSITIONAL_OR_KEYWORD not in kinds)
        if required_keyword:      # a call without keywords always fails: let bind say so
            self._min_positional, self._max_positional = 1, 0
        else:
            self._min_positional = sum(1 for p in positional if not p[2])
            self._max_positional = float("inf") if has_var_positional else len(positional)
        self._signature = None

    @classmethod
    def of(cls, function, drop_first=False):
        """The CallSignature of `function` (without its first parameter when
        drop_first: self of a method), or None if it has no readable one."""
        try:
            signature = inspect.signature(function)
        except (TypeError, ValueError):
            return None                  # e.g. some builtins: calls are not checked
        parameters = list(signature.parameters.values())
        if drop_first:
            if not parameters or parameters[0].kind not in _POSITIONAL:
                if parameters and parameters[0].kind == inspect.Parameter.VAR_POSITIONAL:
                    return cls.from_params(_compact(parameters))
                return None
            parameters = parameters[1:]
        return cls.from_params(_compact(parameters))

    @classmethod
    def from_params(cls, params):
        if params is None:
            return None
        found = _cache.get(params)
        if found is None:
            if len(_cache) > 4096:
                _cache.clear()
            found = _cache[params] = cls(params)
        return found

    def check(self, args, kwargs, where):
        """Raise TypeError if args and kwargs cannot be bound to the parameters.

        `where` names the call in the message: a str, or (class name, method
        name) of an actor method; it is formatted only for the message.
        """
        if self.free:
            return
        if not kwargs and self._min_positional <= len(args) <= self._max_positional:
            return
        signature = self._signature
        if signature is None:
            signature = self._signature = inspect.Signature([
                inspect.Parameter(name, kind, default=_DEFAULT if has_default
                                  else inspect.Parameter.empty)
                for name, kind, has_default in self.params])
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exc:
            if isinstance(where, tuple):
                class_name, method_name = where
                where = f"{class_name.rpartition('.')[2]}.{method_name}.remote()"
            raise TypeError(f"{where}: {exc} (its parameters are {signature})") from None


def _compact(parameters):
    # Kinds as plain ints: the tuple crosses sockets inside actor specs.
    return tuple((p.name, int(p.kind), p.default is not inspect.Parameter.empty)
                 for p in parameters)
