"""The stored formats: their tags, and the P5 layout and its validating parser.

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
"""
import struct

from minray.exceptions import SerializationError

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


def _as_byte_view(buf):
    mv = buf if type(buf) is memoryview else memoryview(buf)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


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
