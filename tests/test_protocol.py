"""The wire format decodes what it encodes and rejects everything else with a reason."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmqexec import ProtocolError
from zmqexec.wire import protocol as P

ZXV = b"ZX" + bytes((P.PROTOCOL_VERSION,))  # magic and this version


def test_small_parts_share_one_frame_and_large_ones_keep_their_own():
    big = memoryview(b"x" * P.PACK_LIMIT)
    payload = [b"function", b"args-1", big, b"args-3"]
    meta = {"f": ["fid"], "t": [['"a"', 1, 3, 0, "fid", "", 1], ['"b"', 0, 3, 0, "fid", "", 1],
                                ['"c"', 0, 3, 0, "fid", "", 1]]}
    frames = P.encode(P.SUBMIT, meta, payload)
    assert len(frames) == 4  # header, blob, packed small parts, the large part
    assert frames[1] is payload[0] and frames[3] is big
    msg = P.decode(frames)
    assert (msg.cmd, msg.name, msg.meta["t"]) == (P.SUBMIT, "SUBMIT", meta["t"])
    assert [bytes(p) for p in msg.payload] == [bytes(p) for p in payload]


@pytest.mark.parametrize("sizes, frames", [
    ([5], [b"1234"]), ([2, -1], [b"12"]), ("bad", [b"12"]), ([-2], [b""]),
])
def test_packed_parts_that_do_not_add_up_are_rejected(sizes, frames):
    head = ZXV + b"\x0e" + json.dumps({"r": [["k", "finished", 1]] * len(sizes),
                                       "z": sizes}).encode()
    with pytest.raises(ProtocolError):
        P.decode([head, *frames])


@pytest.mark.parametrize("frames, reason", [
    ([], "empty"),
    ([b"XX\x01\x01{}"], "magic"),
    ([b"ZX\x09\x0a{}"], "protocol version: 9"),
    ([ZXV + b"\xff{}"], "unknown command"),
    ([ZXV + b"\x0a{nope"], "not JSON"),
    ([ZXV + b"\x0a[]"], "not a JSON object"),
    ([ZXV + b'\x0a{"t": [], "f": 1}'], "field 'f'"),
    ([ZXV + b'\x0a{"t": [["a", true, 0, 0, "f", "", 1]], "f": []}', b"t"], "malformed"),
    ([ZXV + b'\x0a{"t": [["a", 0, 0, 0, "f", "", 1]], "f": []}'], "0 payload frames"),
    ([ZXV + b'\x0a{"t": [["a", 0, 0, 0, "f", "", -1]], "f": []}'], "negative"),
    ([ZXV + b'\x12{"k": "a"}', b"extra"], "1 payload frames"),
    ([ZXV + b'\x13{"ks": [1]}'], "list of short strings"),
    ([ZXV + b'\x12{"k": "' + b"a" * 5000 + b'"}'], "key longer"),
    ([ZXV + b'\x0e{"r": [], "f": true}'], "'f' must be a list"),  # RESULT: "f" optional
    ([ZXV + b'\x16{"ks": ["a"], "c": 1}'], "field 'c'"),  # CANCELLED: c is a bool
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


@pytest.mark.parametrize("cmd, meta, payload", [
    (P.TASK, {"f": ["fid"], "t": [["k" * 3000 + str(i), 1, "c", "fid", "", 1]
                                  for i in range(300)]},
     [b"blob"] + [b"x%d" % i for i in range(300)]),
    (P.RESULT, {"r": [["k" * 3000 + str(i), "finished", 2, None] for i in range(300)]},
     [b"%d" % i for i in range(600)]),
    (P.RELEASE, {"ks": ["k" * 4000 + str(i) for i in range(300)]}, []),
])
def test_a_batch_too_large_for_one_header_is_split_with_its_frames(cmd, meta, payload):
    parts = P.encode_split(cmd, meta, payload)
    assert len(parts) > 1 and all(len(part[0]) < P.MAX_HEADER_BYTES for part in parts)
    decoded = [P.decode(part) for part in parts]
    name = "ks" if cmd == P.RELEASE else next(iter(k for k in meta if k != "f"))
    assert [row for m in decoded for row in m.meta[name]] == meta[name]
    assert [bytes(f) for m in decoded for f in m.payload] == payload
    if cmd == P.TASK:  # blobs go with the first part only
        assert [m.meta["f"] for m in decoded] == [["fid"]] + [[]] * (len(parts) - 1)


@pytest.mark.parametrize("riders", [
    {"s": "not-a-list"}, {"s": [1]}, {"s": ["k"] * (P.RIDER_MAX + 1)},
    {"st": [["k"]]}, {"st": [["k", 1]]}, {"st": "x"}, {"s": ["x" * (P.MAX_KEY_LENGTH + 1)]},
    {"s": None}, {"st": None},
])
def test_malformed_notices_riding_in_a_result_are_refused(riders):
    frames = P.encode(P.RESULT, {"r": [['"k"', "finished", 1]], **riders}, [b"v"])
    with pytest.raises(P.ProtocolError):
        P.decode(frames)


def test_notices_riding_in_a_result_decode():
    meta = {"r": [['"k"', "finished", 1]], "s": ['"a"'], "st": [['"b"', "running"]]}
    msg = P.decode(P.encode(P.RESULT, meta, [b"v"]))
    assert msg.meta["s"] == ['"a"'] and msg.meta["st"] == [['"b"', "running"]]


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(_json_values)
def test_header_json_is_the_stdlib_json(value):
    """Headers are written and read with the C encoder and scanner directly; the text and
    the values must be exactly what the json module would give."""
    text = P.dumps(value)
    assert text == json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    assert P.loads(text) == json.loads(text)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet='{}[]",:0123456789.eE+-truefalsnul \\\n\tü', max_size=30))
def test_header_json_accepts_and_refuses_what_the_stdlib_does(text):
    try:
        expected = json.loads(text)
    except ValueError:
        with pytest.raises(ValueError):
            P.loads(text)
    else:
        assert P.loads(text) == expected


def test_a_header_nested_too_deep_is_refused_not_raised():
    """json gives up on deep nesting with RecursionError: that must be a ProtocolError
    (counted and dropped), never an exception out of the broker's loop."""
    head = ZXV + bytes((P.SUBMIT,)) + b'{"t": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(P.ProtocolError, match="not JSON"):
        P.decode([head])


def test_a_key_longer_than_the_limit_is_refused_in_any_row():
    long_key = '"' + "k" * P.MAX_KEY_LENGTH + '"'
    submit = P.encode(P.SUBMIT, {"f": [], "t": [[long_key, 0, 0, 0, "f", "", 1]]}, [b"a"])
    with pytest.raises(P.ProtocolError, match="malformed"):
        P.decode(submit)
    assert not P.may_ride([long_key])
