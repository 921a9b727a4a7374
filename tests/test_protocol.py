"""The wire format decodes what it encodes and rejects everything else with a reason."""
from __future__ import annotations

import pytest

from zmqexec import ProtocolError
from zmqexec import protocol as P


def test_encode_decode_round_trip_keeps_payload_frames_untouched():
    payload = [b"\x80\x05pickle", memoryview(b"big")]
    frames = P.encode(P.SUBMIT, {"k": '"a"', "p": 1, "r": 3, "pure": False}, payload)
    assert len(frames) == 3 and frames[1] is payload[0] and frames[2] is payload[1]
    msg = P.decode(frames)
    assert (msg.cmd, msg.name, msg.meta["p"]) == (P.SUBMIT, "SUBMIT", 1)
    assert msg.payload == payload


@pytest.mark.parametrize("frames, reason", [
    ([], "empty"),
    ([b"XX\x01\x01{}"], "magic"),
    ([b"ZX\x09\x0a{}"], "protocol version 9"),
    ([b"ZX\x01\xff{}"], "unknown command"),
    ([b"ZX\x01\x0a{nope"], "not JSON"),
    ([b"ZX\x01\x0a[]"], "not a JSON object"),
    ([b'ZX\x01\x0a{"k": 1, "p": 0, "r": 0}', b"t"], "field 'k'"),
    ([b'ZX\x01\x0a{"k": "a", "p": true, "r": 0}', b"t"], "field 'p'"),
    ([b'ZX\x01\x0a{"k": "a", "p": 0, "r": 0}'], "0 payload frames"),
    ([b'ZX\x01\x12{"k": "a"}', b"extra"], "1 payload frames"),
    ([b'ZX\x01\x12{"k": "' + b"a" * 5000 + b'"}'], "key longer"),
    ([object()], "not bytes"),
])
def test_malformed_messages_are_rejected_with_a_reason(frames, reason):
    with pytest.raises(ProtocolError, match=reason):
        P.decode(frames)


def test_hello_of_another_version_still_decodes_so_it_can_be_refused():
    msg = P.decode([b'ZX\x07\x01{"role": "client", "id": "x", "proto": 7}'])
    assert msg.cmd == P.HELLO and msg.meta["proto"] == 7


@pytest.mark.parametrize("key", ["add-1", ("x", 1), ("a", "b", 3), "ünïcode"])
def test_keys_round_trip_through_their_wire_form(key):
    assert P.key_from_wire(P.key_to_wire(key)) == key


@pytest.mark.parametrize("key", [1, ["x"], ("x", 1.5), ("x", True), None, b"bytes"])
def test_keys_of_other_shapes_are_refused(key):
    with pytest.raises(TypeError, match="key must be"):
        P.key_to_wire(key)
