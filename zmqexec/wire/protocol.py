"""The zmqexec wire format: the only module that knows how messages look on the socket.

Every message is a ZeroMQ multipart message (the ROUTER adds the peer's routing id in
front on the broker side)::

    frame 0  header   b"ZX" | version (1 byte) | command (1 byte) | JSON object (UTF-8)
    frame 1+ payload  opaque bytes (pickles), forwarded by the broker untouched

The JSON object holds the small fixed fields a router needs (key, priority, retries,
state, sizes).  The broker decodes frame 0 only; payload frames are never parsed or
unpickled there.  Keys travel as ``key_wire``: the compact JSON text of the key (a string
or a list), so the broker can use them as dictionary keys without knowing their shape.

Messages that carry tasks or results are batches: one header row per task, and the
payload frames of all rows in order (function blobs named in ``f`` first).  Under load one
message carries many tasks; a lone task still goes out at once, as a batch of one.  A
batch whose header could pass a quarter of ``MAX_HEADER_BYTES`` (long keys) leaves as
several messages (``encode_split``), since receivers drop larger headers.

=========  ==============  =============================================  ==============
command    direction       header fields                                  payload
=========  ==============  =============================================  ==============
HELLO      peer -> broker  role, id, proto, versions, host, pid,          -
                           name, hb, ttl; agents: slots, prefetch,
                           running (keys held), epoch (last one seen);
                           clients: nw (no_workers_timeout)
WELCOME    broker -> peer  epoch, heartbeat, window, window_bytes,        -
                           max_frame, max_message, slots, hold
REFUSE     broker -> peer  reason                                         -
RESET      broker -> peer  reason (peer must HELLO again)                 -
SUBMIT     client -> b.    f: [fid], t: [[k, priority, retries, pure,     blobs, then each
                           fid, iid, nframes(, timeout(, mid))]]          task's frames
TASK       b. -> agent     f: [fid], t: [[k, attempt, client, fid, iid,   blobs, then each
                           nframes(, timeout(, mid))]]                    task's frames
STARTED    agent -> b.     ks: [k]                                        -
STATE      b. -> client    r: [[k, queued|running]]                       -
RESULT     agent -> b.     r: [[k, finished|error, nframes]], p: new      result frames
                           prefetch (optional, when the agent resizes it),
                           s: [k] started (optional: a STARTED notice
                           riding along, applied before the rows)
RESULT     b. -> client    r: [[k, finished|error|lost, nframes, error    result frames
                           fields or null]] (null unless the broker
                           made the error), st: [[k, queued|running]]
                           (optional: a STATE notice riding along,
                           applied before the rows)
DEATH      agent -> b.     k, exit (exit code or signal name), why        -
                           ("timeout" or "killed" if the agent did it)
DROPPED    agent -> b.     ks: [k] (given back unstarted, free)           -
CANCEL     client/b. ->    ks: [k] (drop these if not started; a client   -
                           gets a CANCELLED answer for each key)
KEPT       agent -> b.     ks: [k] (a CANCEL found these started)         -
CANCELLED  b. -> client    ks: [k], c: true (cancelled: never to start)   -
                           or false (started or done: they run on)
KILL       client/b. ->    ks: [k] (stop these if running)                -
SHARED     client -> b.    op (vset, vget, vdel, qput, qget, qsize), n    a value's pickle
                           (name), r (request id), t (timeout), k (a      (unless k); nf
                           key as value), m (maxsize), b (batch), nf,     counts them
                           a (sent again after a reconnect)
SHARED     b. -> client    r, v: [["k", key] or ["b", null]], size, nf,   the values' pickles
                           or e: [error type, message]
INFORM     client -> b.    k                                              -
RELEASE    client -> b.    ks: [k]                                        -
HEARTBEAT  both ways       epoch, slots and n (RESULT rows received, to   -
                           an agent) from the broker, hold (to a client:
                           keep new submits, results pinned for tasks
                           pass the held limit; also sent when it
                           changes); slots and drain from an agent
STATUS     both ways       request: {}; reply: the status document        -
BYE        both ways       reason                                         -
=========  ==============  =============================================  ==============

``fid`` and ``iid`` name a pickled function and initializer by content hash (``iid`` is
"" without one), ``mid`` the sources of the client's own modules (remote mode; "" for
none): a blob crosses each link once, and the broker and agents keep it.
"""
from __future__ import annotations

import json
import json.encoder
import json.scanner
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence, Tuple

from ..errors import ProtocolError

PROTOCOL_VERSION = 4  # 2: riding notices; 3: CANCEL is answered (KEPT, CANCELLED);
# 4: tasks name the client's own modules (mid), which travel as a blob
PACK_LIMIT = 1 << 16  # payload parts smaller than this share one frame in a batch
MAGIC = b"ZX"
MAX_KEY_LENGTH = 4096
MAX_HEADER_BYTES = 1 << 20

HELLO, WELCOME, REFUSE, RESET = 1, 2, 3, 4
SUBMIT, TASK, STARTED, STATE, RESULT = 10, 11, 12, 13, 14
DEATH, DROPPED, CANCEL, INFORM, RELEASE, KILL = 15, 16, 17, 18, 19, 20
KEPT, CANCELLED, SHARED = 21, 22, 23
HEARTBEAT, STATUS, BYE = 30, 31, 32

NAMES = {
    HELLO: "HELLO", WELCOME: "WELCOME", REFUSE: "REFUSE", RESET: "RESET",
    SUBMIT: "SUBMIT", TASK: "TASK", STARTED: "STARTED", STATE: "STATE",
    RESULT: "RESULT", DEATH: "DEATH", DROPPED: "DROPPED", CANCEL: "CANCEL",
    INFORM: "INFORM", RELEASE: "RELEASE", KILL: "KILL", KEPT: "KEPT",
    CANCELLED: "CANCELLED", SHARED: "SHARED", HEARTBEAT: "HEARTBEAT", STATUS: "STATUS",
    BYE: "BYE",
}

# Required header fields and their types; extra fields are allowed and ignored.
_SCHEMA: Dict[int, Dict[str, Tuple[type, ...]]] = {
    HELLO: {"role": (str,), "id": (str,), "proto": (int,)},
    WELCOME: {"epoch": (str,)},
    REFUSE: {"reason": (str,)},
    RESET: {},
    SUBMIT: {"t": (list,), "f": (list,)},
    TASK: {"t": (list,), "f": (list,)},
    STARTED: {"ks": (list,)},
    STATE: {"r": (list,)},
    RESULT: {"r": (list,)},
    DEATH: {"k": (str,)},
    DROPPED: {"ks": (list,)},
    CANCEL: {"ks": (list,)},
    INFORM: {"k": (str,)},
    RELEASE: {"ks": (list,)},
    KILL: {"ks": (list,)},
    KEPT: {"ks": (list,)},
    CANCELLED: {"ks": (list,), "c": (bool,)},
    SHARED: {"r": (int,)},
    HEARTBEAT: {},
    STATUS: {},
    BYE: {},
}
# Row shapes of batch fields (a row may carry more fields than its shape names).
_ROWS: Dict[Tuple[int, str], Tuple[type, ...]] = {
    (SUBMIT, "t"): (str, int, int, int, str, str, int),
    (TASK, "t"): (str, int, str, str, str, int),
    (RESULT, "r"): (str, str, int),
    (STATE, "r"): (str, str),
}
# Optional notices a RESULT may carry instead of a message of their own (one message per
# loop turn instead of two): the agent's started keys, the broker's state rows.
_RIDERS = {"s": STARTED, "st": STATE}
RIDER_MAX = 64  # rows a rider may have; more leave as a message of their own
RIDER_BYTES = 16 << 10  # key characters a rider may carry, likewise
# Rows whose last named field counts payload frames, after the blobs named in "f".
_FRAMED = {SUBMIT: "t", TASK: "t", RESULT: "r"}

ROLES = ("client", "worker", "status")


@dataclass
class Message:
    """A decoded message: command, header fields, and the untouched payload frames."""

    cmd: int
    meta: Dict[str, Any]
    payload: List[Any] = field(default_factory=list)

    @property
    def name(self) -> str:
        return NAMES.get(self.cmd, str(self.cmd))


_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_decoder = json.JSONDecoder()
_make_encoder = getattr(json.encoder, "c_make_encoder", None)  # the C accelerators
_make_scanner = getattr(json.scanner, "c_make_scanner", None)
_c_encode = _make_encoder and _make_encoder(
    None, _encoder.default, json.encoder.encode_basestring, None, ":", ",", False, False,
    True)
_c_scan = _make_scanner and _make_scanner(_decoder)


def dumps(obj: Any) -> str:
    """Compact JSON text; the C encoder made once (``JSONEncoder.encode`` makes one per
    call, which cost half of a small header's encoding).  No cycle check: headers and
    keys are plain trees of lists, dicts, strings and numbers."""
    if _c_encode is None:  # pragma: no cover - CPython has the C accelerator
        return _encoder.encode(obj)
    return "".join(_c_encode(obj, 0))


def loads(text: str) -> Any:
    """``json.loads`` for headers: the C scanner directly in the usual case (a header as
    ``dumps`` writes it), the stdlib's full decoder for anything else and its errors."""
    if _c_scan is not None:
        try:
            value, end = _c_scan(text, 0)
            if end == len(text):
                return value
        except (StopIteration, ValueError):
            pass
    return _decoder.decode(text)


def _row_check(shape: Tuple[type, ...]) -> Any:
    """A validator for rows of one shape, ``row -> bool``; it runs once per task, so it
    compares the field types in one C-level step (a bool is not accepted as an int)."""
    width = len(shape)

    def valid(row: Any) -> bool:  # (every row shape starts with a key: a short one)
        return type(row) is list and len(row) >= width and \
            tuple(map(type, row[:width])) == shape and len(row[0]) <= MAX_KEY_LENGTH

    return valid


# Per command: the batch field, its row validator and width, and whether rows count frames.
_ROW_FIELDS = {cmd: (name, _row_check(shape), len(shape), _FRAMED.get(cmd) == name)
               for (cmd, name), shape in _ROWS.items()}
_LISTS = {cmd: tuple(n for n in ("ks", "f") if n in schema) for cmd, schema in
          _SCHEMA.items()}


def encode(cmd: int, meta: Dict[str, Any], payload: Sequence[Any] = ()) -> List[Any]:
    """Frames for one message: the header frame, then the payload.

    In a batch, parts under ``PACK_LIMIT`` bytes travel concatenated in one frame (``z``
    lists each part's size, -1 for a part sent as its own frame): every frame costs a
    send and a receive on each hop, while a large part keeps its own zero-copy frame.
    """
    if cmd in _FRAMED and payload:
        nblobs = len(meta.get("f") or ())
        sizes: List[int] = []
        small: List[Any] = []
        big: List[Any] = []
        for part in payload[nblobs:]:
            size = len(part)
            if size < PACK_LIMIT:
                sizes.append(size)
                small.append(part)
            else:
                sizes.append(-1)
                big.append(part)
        if small:
            meta = dict(meta, z=sizes)
            head = MAGIC + bytes((PROTOCOL_VERSION, cmd)) + dumps(meta).encode()
            return [head, *payload[:nblobs], b"".join(small), *big]
    head = MAGIC + bytes((PROTOCOL_VERSION, cmd)) + dumps(meta).encode()
    return [head, *payload]


HEADER_BUDGET = MAX_HEADER_BYTES // 4  # senders split batches whose header may pass this
_ROW_COST = 256  # bytes a row may take besides its key (fields, an error text)
_BATCH = {SUBMIT: "t", TASK: "t", RESULT: "r", STATE: "r", STARTED: "ks", DROPPED: "ks",
          CANCEL: "ks", RELEASE: "ks", KILL: "ks", KEPT: "ks", CANCELLED: "ks"}


def encode_split(cmd: int, meta: Dict[str, Any], payload: Sequence[Any] = ()
                 ) -> List[List[Any]]:
    """``encode``, as several messages if a batch's header passes ``HEADER_BUDGET``.

    Receivers drop a header over ``MAX_HEADER_BYTES``, so every sender of a batch splits
    it here, each part with its rows' frames (the blobs named in ``f`` go with the first
    part, which arrives first).  Parts are cut by an estimate of each row's size (its key
    plus ``_ROW_COST``), which keeps each part well under the cap."""
    whole = encode(cmd, meta, payload)  # the usual case: measured once it is made
    name = _BATCH.get(cmd, "")
    rows = meta.get(name)
    if not rows or len(whole[0]) <= HEADER_BUDGET:
        return [whole]
    keyed = name != "ks"
    framed = _FRAMED.get(cmd) == name
    count_at = _ROW_FIELDS[cmd][2] - 1 if framed else 0
    nblobs = len(meta.get("f") or ())
    parts: List[List[Any]] = []
    chunk: List[Any] = []
    frames: List[Any] = list(payload[:nblobs])
    at, size = nblobs, 0
    for row in rows:
        cost = (len(row[0]) if keyed else len(row)) + _ROW_COST
        if chunk and size + cost > HEADER_BUDGET:
            parts.append(encode(cmd, _part(meta, name, chunk, parts), frames))
            chunk, frames, size = [], [], 0
        chunk.append(row)
        size += cost
        if framed:
            frames.extend(payload[at:at + row[count_at]])
            at += row[count_at]
    parts.append(encode(cmd, _part(meta, name, chunk, parts), frames))
    return parts


def _part(meta: Dict[str, Any], name: str, rows: List[Any], parts: List[Any]
          ) -> Dict[str, Any]:
    """The header of one part of a split batch: its rows, and no blobs after the first."""
    out = dict(meta)
    out[name] = rows
    if parts:  # blobs and riding notices go with the first part only
        if "f" in meta:
            out["f"] = []
        for rider in _RIDERS:
            out.pop(rider, None)
    return out


def _unpack_parts(meta: Dict[str, Any], frames: List[Any]) -> List[Any]:
    """The payload parts of a batch whose small parts share one frame (see ``encode``)."""
    sizes = meta["z"]
    if type(sizes) is not list or not all(type(n) is int and n >= -1 for n in sizes):
        raise ProtocolError("'z' must be a list of part sizes")
    nblobs = len(meta.get("f") or ())
    if len(frames) < nblobs + 1:
        raise ProtocolError("packed parts frame missing")
    packed = memoryview(frames[nblobs])
    big = frames[nblobs + 1:]
    parts = list(frames[:nblobs])
    at = taken = 0
    for size in sizes:
        if size >= 0:
            parts.append(packed[at:at + size])
            at += size
        elif taken < len(big):
            parts.append(big[taken])
            taken += 1
        else:
            raise ProtocolError("fewer frames than 'z' names")
    if at != packed.nbytes or taken != len(big):
        raise ProtocolError("packed parts do not match their sizes")
    return parts


def decode(frames: Sequence[Any]) -> Message:
    """Parse the header frame and validate it; raise ProtocolError saying what is wrong.

    ``frames`` may hold ``bytes`` or ``zmq.Frame`` objects; payload frames are returned as
    given, so a router forwards them without a copy.
    """
    if not frames:
        raise ProtocolError("empty message")
    head = frames[0]
    raw = head if isinstance(head, bytes) else getattr(head, "bytes", None)
    if not isinstance(raw, bytes):
        raise ProtocolError("header frame is not bytes")
    if len(raw) < 4 or raw[:2] != MAGIC:
        raise ProtocolError("bad magic (not a zmqexec peer)")
    cmd = raw[3]
    if raw[2] != PROTOCOL_VERSION and cmd not in (HELLO, REFUSE):
        # HELLO and REFUSE keep their shape across versions, so a mismatch gets a reason
        raise ProtocolError(f"wrong protocol version: {raw[2]} (this side speaks "
                            f"{PROTOCOL_VERSION})")
    schema = _SCHEMA.get(cmd)
    if schema is None:
        raise ProtocolError(f"unknown command: {cmd}")  # (before the colon: the reason)
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError("header too large")
    try:
        meta = loads(raw[4:].decode()) if len(raw) > 4 else {}
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # (nested too deep)
        raise ProtocolError(f"header is not JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ProtocolError("header is not a JSON object")
    for name, types in schema.items():
        value = meta.get(name)
        if not isinstance(value, types) or isinstance(value, bool) and bool not in types:
            raise ProtocolError(f"{NAMES[cmd]}: field {name!r} missing or of wrong type")
    key = meta.get("k")
    if isinstance(key, str) and len(key) > MAX_KEY_LENGTH:
        raise ProtocolError(f"{NAMES[cmd]}: key longer than {MAX_KEY_LENGTH}")
    for name in _LISTS.get(cmd, ()):
        if not all(type(v) is str and len(v) <= MAX_KEY_LENGTH for v in meta[name]):
            raise ProtocolError(f"{NAMES[cmd]}: {name!r} must be a list of short strings")
    if cmd == RESULT and ("s" in meta or "st" in meta):
        _check_riders(meta)
    if "f" in meta and type(meta["f"]) is not list:  # (it counts payload frames below)
        raise ProtocolError(f"{NAMES[cmd]}: 'f' must be a list of blob ids")
    payload = list(frames[1:])
    if "z" in meta and cmd in _FRAMED:
        payload = _unpack_parts(meta, payload)
    expected = 0
    rows = _ROW_FIELDS.get(cmd)
    if rows is not None:
        name, valid, width, framed = rows
        for row in meta[name]:
            if not valid(row):
                raise ProtocolError(f"{NAMES[cmd]}: malformed {name!r} row")
            if framed:
                if row[width - 1] < 0:
                    raise ProtocolError(f"{NAMES[cmd]}: negative frame count")
                expected += row[width - 1]
        if framed:
            expected += len(meta.get("f") or ())
    elif cmd == SHARED:  # values' pickles: as many as "nf" says
        expected = meta.get("nf", 0)
        if type(expected) is not int or expected < 0:
            raise ProtocolError("SHARED: 'nf' must be a count of payload frames")
    if expected != len(payload):
        raise ProtocolError(f"{NAMES[cmd]}: {len(payload)} payload frames, "
                            f"header names {expected}")
    return Message(cmd, meta, payload)


def may_ride(keys: Sequence[str]) -> bool:
    """Whether a notice naming ``keys`` may ride in a RESULT (it is small enough)."""
    return len(keys) <= RIDER_MAX and sum(map(len, keys)) <= RIDER_BYTES and \
        all(len(kw) <= MAX_KEY_LENGTH for kw in keys)


def _check_riders(meta: Dict[str, Any]) -> None:
    """Validate the STARTED keys (``s``) or STATE rows (``st``) a RESULT carries
    (by presence: a JSON null is refused too)."""
    if "s" in meta:
        started = meta["s"]
        if not (type(started) is list and len(started) <= RIDER_MAX and
                all(type(k) is str and len(k) <= MAX_KEY_LENGTH for k in started)):
            raise ProtocolError("RESULT: 's' must be a short list of keys")
    if "st" in meta:
        states = meta["st"]
        valid = _ROW_FIELDS[STATE][1]
        if type(states) is not list or len(states) > RIDER_MAX or \
                not all(valid(row) and len(row[0]) <= MAX_KEY_LENGTH for row in states):
            raise ProtocolError("RESULT: 'st' must be a short list of [key, state] rows")


def key_to_wire(key: Any) -> str:
    """The canonical wire text of a key: ``str`` or a tuple of ``str``/``int``."""
    if isinstance(key, str):
        pass
    elif isinstance(key, tuple) and all(
        isinstance(part, (str, int)) and not isinstance(part, bool) for part in key
    ):
        pass
    else:
        raise TypeError(f"a key must be a str or a tuple of str/int, not {key!r}")
    wire = dumps(key)
    if len(wire) > MAX_KEY_LENGTH:
        raise ValueError(f"key is longer than {MAX_KEY_LENGTH} characters when encoded")
    return wire


def key_from_wire(wire: str) -> Any:
    """The key a ``key_wire`` names (JSON arrays become tuples)."""
    value = json.loads(wire)
    return tuple(value) if isinstance(value, list) else value
