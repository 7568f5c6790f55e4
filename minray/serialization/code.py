"""Pickling code (functions, classes) so remote tracebacks stay readable.

cloudpickle 3.1 replaces every code object's file name with "<dynamic-code>"
(for byte-identical pickles wherever a function was defined), which leaves a
remote traceback without file names or source lines. minray's picklers keep
the real name: a code object is rebuilt by cloudpickle's own reducer, then
given its file name back. The name only feeds tracebacks (linecache reads
the source where the file exists, as on a single machine or a synced cluster).
"""
import io
import types

import cloudpickle

_base_code_reduce = cloudpickle.Pickler.dispatch_table[types.CodeType]


def rebuild_code(constructor, args, filename):
    code = constructor(*args)
    return code.replace(co_filename=filename) if code.co_filename != filename else code


def reduce_code(code):
    constructor, args = _base_code_reduce(code)[:2]
    return rebuild_code, (constructor, args, code.co_filename)


class CodePickler(cloudpickle.Pickler):
    """cloudpickle's Pickler with code objects that keep their file names."""

    dispatch_table = cloudpickle.Pickler.dispatch_table.new_child(
        {types.CodeType: reduce_code})


def dumps_code(obj):
    """cloudpickle.dumps for exported functions and classes."""
    f = io.BytesIO()
    CodePickler(f, protocol=5).dump(obj)
    return f.getvalue()
