"""Decoding frames: many per read, with one unpickler, exactly as sent."""
import pickle
import socket

import pytest

import minray
from minray import wire
from minray.session import node_socket_path, read_token


def frames_of(messages):
    return bytearray(b"".join(wire.encode(m) for m in messages))


def test_frames_sharing_objects_decode_as_sent():
    # Each frame's pickle numbers its memoized objects from 0: a memo kept
    # from the frame before would make later frames refer to its objects.
    messages = [("task", [("r", b"a" * 20), ("v", b"m", b"x" * 30)], {"CPU": 1.0}),
                ("obj", b"b" * 20, 2, b"meta", b"meta"),
                ("task", [("r", b"c" * 20)], {"CPU": 1.0}, ["shared", "shared"])] * 50
    buffer = frames_of(messages)
    decoded = list(wire.decode_frames(buffer))
    assert [message for message, _ in decoded] == messages
    assert [size for _, size in decoded] == [len(pickle.dumps(m, protocol=5)) for m in messages]
    assert buffer == bytearray()


def test_a_partial_frame_waits_in_the_buffer():
    whole = frames_of([("a", 1), ("b", 2)])
    cut = len(whole) - 3
    buffer = bytearray(whole[:cut])
    assert [m for m, _ in wire.decode_frames(buffer)] == [("a", 1)]
    assert buffer == whole[len(wire.encode(("a", 1))):cut]
    buffer += whole[cut:]
    assert [m for m, _ in wire.decode_frames(buffer)] == [("b", 2)]
    assert not buffer


def test_stopping_early_leaves_the_rest():
    buffer = frames_of([("a", 1), ("b", 2), ("c", 3)])
    frames = wire.decode_frames(buffer)
    assert next(frames)[0] == ("a", 1)
    frames.close()
    assert [m for m, _ in wire.decode_frames(buffer)] == [("b", 2), ("c", 3)]


def test_an_oversized_frame_fails_after_the_frames_before_it():
    buffer = frames_of([("small", 1)]) + wire.FRAME_HEADER.pack(1000)
    frames = wire.decode_frames(buffer, max_frame=100)
    assert next(frames)[0] == ("small", 1)
    with pytest.raises(wire.ProtocolError, match="exceeds the 100 byte limit"):
        next(frames)
    # The first frame's own limit, then the ordinary one.
    buffer = frames_of([("x" * 50,), ("y" * 50,)])
    assert len(list(wire.decode_frames(buffer, max_frame=100, first_max_frame=80))) == 2
    buffer = frames_of([("x" * 50,)])
    with pytest.raises(wire.ProtocolError, match="exceeds the 40 byte limit"):
        list(wire.decode_frames(buffer, max_frame=100, first_max_frame=40))


@pytest.mark.parametrize("payload, reason", [
    (pickle.dumps(("a", 1), protocol=5) + b"extra", "does not end where the frame does"),
    (pickle.dumps(("a", 1), protocol=5)[:-4], "undecodable frame"),
    (pickle.dumps(socket.socket, protocol=5), "only plain data"),
])
def test_a_frame_that_is_not_one_plain_pickle_is_refused(payload, reason):
    buffer = bytearray(wire.FRAME_HEADER.pack(len(payload)) + payload)
    with pytest.raises(wire.ProtocolError, match=reason):
        list(wire.decode_frames(buffer))


def test_the_node_manager_drops_a_peer_whose_frame_carries_trailing_bytes():
    context = minray.init(num_cpus=1)
    try:
        session_dir = context["session_dir"]
        sock = wire.connect(node_socket_path(session_dir), read_token(session_dir))
        bad = pickle.dumps(("hello", "driver", {}), protocol=5) + b"\x00trailing"
        sock.sendall(wire.FRAME_HEADER.pack(len(bad)) + bad)
        sock.settimeout(30)
        while sock.recv(1 << 16):
            pass                                  # until it closes the connection
        sock.close()

        @minray.remote
        def still(x):
            return x + 1

        assert minray.get([still.remote(i) for i in range(10)]) == list(range(1, 11))
    finally:
        minray.shutdown()
