"""The client's connection to a remote broker: the I/O thread that owns the DEALER socket.

::

    user threads --(Mailbox: commands + wake pipe)--> I/O thread --SUBMIT/INFORM/...--> broker
        submit(): a Pending record in ClientState       | Link: credit window, batches,
                                                        |   attach timers
                                                        | heartbeats, broker liveness
    broker --RESULT/STATE--> I/O thread -> Link --(Completions)--> completion thread
                                                  unpickle -> set_result / set_exception
                                                  -> callbacks (may block: the socket
                                                     keeps going)
                             I/O thread -> Link --(divert: Pending.arrived)--> a user
                                                  thread blocked in Future.result() for
                                                  that key, which completes it itself

The tables both threads share live in ``state.ClientState``; what the broker's messages
mean lives in ``link.Link``, which the embedded node uses too.  ``ClientIO`` owns the
socket: it encodes, decodes, says HELLO, sends heartbeats and notices a silent broker.

A broker silent past the heartbeat timeout gets a new connection, as an agent does (after
a cut, the old TCP connection may stay mute for many seconds while its retransmissions
back off; a new one is heard at once, and the broker's ROUTER_HANDOVER gives it this
client's identity).  The broker's first word on it says whether it still knows this
client: a RESET (it forgot us: ``Link.reregister``), or anything else (it remembers us:
what died with the old connection is asked for again, by key).  ``broker_timeout`` still
bounds the whole silence.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import zmq

from .._version import __version__
from ..errors import BrokenZMQExecutor, BrokerLostError, ZMQExecError
from ..wire import protocol as P
from ..wire import serialization as S
from ..wire.curve import apply_client
from ..wire.sockets import received
from .items import Broken, Close, Command
from .link import Link, request_status
from .state import ClientState
from .threads import Completions, Mailbox

log = logging.getLogger(__name__)


class ClientIO:
    """The threads and socket of one executor's connection to a broker."""

    def __init__(self, address: str, blobs: Dict[str, bytes], *,
                 heartbeat_interval: float, broker_timeout: float,
                 attach_timeout: float, no_workers_timeout: Optional[float] = None,
                 keys: Optional[Tuple[bytes, bytes, bytes]] = None,
                 heartbeat_timeout: Optional[float] = None) -> None:
        self.address = address
        self.interval = heartbeat_interval
        # silence before a new connection; by default 10 heartbeats, the ratio of the
        # executor's and the agent's defaults (1 s, 10 s)
        self.timeout = 10 * heartbeat_interval if heartbeat_timeout is None \
            else heartbeat_timeout
        self.broker_timeout = broker_timeout
        self.no_workers_timeout = no_workers_timeout
        self.keys = keys  # CurveZMQ: (broker public, our public, our secret)
        self.ident = uuid.uuid4()
        self.mailbox = Mailbox()
        self.post = self.mailbox.post
        self.state = ClientState(self)
        self.completions = Completions(self.state.complete)
        self.defer = self.completions.defer
        self.completion_thread = self.completions.thread
        self.link = Link(self.state, blobs, self._send, self.defer, self._hello,
                         attach_timeout=attach_timeout)
        self.io_thread = threading.Thread(target=self._io_main, name="zmqexec-io", daemon=True)
        self.io_thread.start()

    # ---- called from user threads --------------------------------------------------------------
    def request_status(self, timeout: Optional[float]) -> Dict[str, Any]:
        return request_status(self.post, self.state, timeout)

    def close(self) -> None:
        """Finish once every record is done (or the connection is broken), then disconnect."""
        self.post(Close())

    # ---- the I/O thread -----------------------------------------------------------------------
    def _send(self, cmd: int, meta: Dict[str, Any], payload: Sequence[Any] = ()) -> None:
        """Send without ever blocking: with no usable connection (a broker that refuses
        our handshake, say) the message is dropped and the timers still run, so pending
        futures end with BrokerLostError after ``broker_timeout`` instead of hanging."""
        for message in P.encode_split(cmd, meta, payload):  # batches: under the header cap
            try:
                self._sock.send_multipart(message, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                log.debug("no connection to the broker: %s not sent", P.NAMES.get(cmd))
                return
        self._last_sent = time.monotonic()

    def _hello(self) -> None:
        self._send(P.HELLO, {
            "role": "client", "id": self.ident.hex, "proto": P.PROTOCOL_VERSION,
            "zmqexec": __version__, "python": S.PYTHON_VERSION,
            "cloudpickle": S.CLOUDPICKLE_VERSION, "host": socket.gethostname(),
            "pid": os.getpid(), "hb": self.interval,
            "ttl": max(60.0, self.broker_timeout), "nw": self.no_workers_timeout})

    def _new_socket(self) -> None:
        """A new DEALER with this client's identity (``connect`` is the caller's)."""
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.ident.bytes)
        sock.setsockopt(zmq.IPV6, 1)
        sock.setsockopt(zmq.RECONNECT_IVL, 20)
        # a local (ipc) broker may still be starting: retry every 20 ms, without backoff
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 0 if self.address.startswith("ipc:") else 1000)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 1000)
        if self.keys is not None:
            apply_client(sock, self.keys)
        self._sock = sock
        self._poller.register(sock, zmq.POLLIN)
        self._opened = time.monotonic()

    def _io_main(self) -> None:
        self._ctx = ctx = zmq.Context()
        self._poller = poller = zmq.Poller()
        link, mailbox = self.link, self.mailbox
        now = self._last_heard = self._last_sent = time.monotonic()
        next_check = now
        # after a new connection, until the broker's first word on it: whether it still
        # knows this client is not known yet, so user commands wait (``_held``)
        self._probing = False
        self._held: List[Command] = []
        self._silent_since: Optional[float] = None  # while probing: the last word before
        poller.register(mailbox.wake_fd, zmq.POLLIN)
        self._new_socket()
        try:
            self._sock.connect(self.address)
            self._hello()
            while True:
                events = dict(poller.poll(int(min(self.interval, 0.1) * 1000)))
                commands = mailbox.take(mailbox.wake_fd in events)
                if self._probing and self.state.broken is None:
                    self._held += commands
                    if any(type(c) is Close for c in commands):
                        link.closing = True  # (it sends nothing: no need to wait)
                else:
                    if self._held:  # broken while probing: let them (a Close) through
                        commands = self._take_held() + commands
                    link.apply(commands)
                sock = self._sock
                if sock in events:
                    for frames in received(sock):
                        self._on_frames(frames)
                    link.pump()  # answers freed window space
                now = time.monotonic()
                if now - self._last_sent >= self.interval and not self._probing:
                    if link.window:
                        self._send(P.HEARTBEAT, {})
                    else:  # not welcomed yet: our HELLO may have found no connection
                        self._hello()
                if now - max(self._last_heard, self._opened) > self.timeout and \
                        self.state.broken is None:
                    self._reconnect(now)
                if now >= next_check:
                    next_check = now + 0.2
                    self._timers(now)
                if link.finished:
                    break
            self._send(P.BYE, {"reason": "client closing"})
        except Exception as exc:  # never die silently: every waiter must hear of it
            log.exception("client I/O thread failed")
            self.defer(Broken(BrokenZMQExecutor(f"client I/O failed: {exc!r}")))
        finally:
            self._sock.close(linger=200)
            ctx.term()
            self.completions.close()
            link.close_waiters()

    def _take_held(self) -> List[Command]:
        held, self._held = self._held, []
        return held

    def _reconnect(self, now: float) -> None:
        """Silence past the heartbeat timeout: start over on a new connection.

        After a cut, the old TCP connection may stay mute for many seconds while its
        retransmissions back off, and what it holds both ways is lost with it; a new one
        is heard as soon as the link is back.  Its first message is a heartbeat, not a
        HELLO: a HELLO would register us afresh with a broker that had forgotten us,
        and we could not tell, whereas a heartbeat draws a RESET from such a broker, and
        ``Link.reregister`` keeps the retries=0 rule.  One probe per connection (a RESET
        answers each message of a forgotten peer); user commands wait for the answer."""
        log.warning("no word from the broker at %s for %.1f s: connecting again",
                    self.address, now - self._last_heard)
        self._poller.unregister(self._sock)
        self._sock.close(linger=0)
        self._new_socket()
        self._sock.connect(self.address)
        if self.link.window:
            if not self._probing:
                self._probing = True
                self._silent_since = self._last_heard
            self._send(P.HEARTBEAT, {})
        else:  # never welcomed: nothing was sent that the broker could have kept
            self._hello()

    def _on_frames(self, frames: List[Any]) -> None:
        try:
            msg = P.decode(frames)
        except ZMQExecError as exc:
            log.warning("dropped a malformed message from the broker: %s", exc)
            return
        self._last_heard = time.monotonic()
        if self._probing:
            self._answered(msg)
        else:
            self.link.on_message(msg)

    def _answered(self, msg: P.Message) -> None:
        """The broker's first word after a reconnect: a RESET if it forgot this client
        (``Link.reregister`` registers again and resubmits), anything else if it still
        knows it (what the old connection lost is asked for again).  Either way what
        only the old connection could have answered is asked again (``_ask_again``);
        then the commands that waited."""
        assert self._silent_since is not None
        silence = self._last_heard - self._silent_since
        self._silent_since = None
        self._probing = False
        link = self.link
        link.on_message(msg)
        if msg.cmd == P.RESET:
            asked = self._ask_again(set(link.attaching))  # (reregister informed these)
            log.warning("reconnected to the broker at %s after %.1f s of silence; it had "
                        "forgotten this client", self.address, silence)
        else:
            asked = self._resubmit() + self._ask_again(set())
            link.ask_shared_again()  # (after the submits: a key it puts was submitted)
            link.cancels.extend(link.asking)  # after the submits they name
            link.flush_batches()
            log.warning("reconnected to the broker at %s after %.1f s of silence; asked "
                        "again for %d keys", self.address, silence, asked)
        link.apply(self._take_held())

    def _resubmit(self) -> int:
        """The broker still knows this client, but submits and the results it pushed may
        have died with the old connection: submit again every key sent and not answered
        (the broker matches a key this client wants already and does not run it again:
        it answers with the held result or the key's state), each with its function's
        pickle (a lost SUBMIT may have carried it); how many keys."""
        link, state = self.link, self.state
        link.sent_fids.clear()
        resend = [rec for rec in map(state.records.get, link.sent)
                  if rec is not None and rec.row is not None]
        link.sent.clear()
        link.sent_bytes = 0
        link.backlog.extendleft(reversed(resend))  # first in line, in their order
        link.pump()
        return len(resend)

    def _ask_again(self, informed: Set[str]) -> int:
        """Ask again what only the old connection could have answered: the keys of
        ``Future(key)`` records (but ``informed``; the broker answers an INFORM with the
        held result or the key's state) and the status requests still waiting; how many
        keys."""
        link, state = self.link, self.state
        with state.lock:
            attached = [kw for kw, rec in state.records.items()
                        if rec.row is None and kw not in informed]
        deadline = time.monotonic() + link.attach_timeout
        for kw in attached:
            if kw in link.attaching:
                link.attaching[kw] = deadline
            link.send(P.INFORM, {"k": kw}, ())
        for _ in link.status_waiters:
            link.send(P.STATUS, {}, ())
        return len(attached)

    def _timers(self, now: float) -> None:
        if now - self._last_heard > self.broker_timeout and self.state.broken is None:
            self.defer(Broken(BrokerLostError(
                f"no word from the broker at {self.address} for "
                f"{now - self._last_heard:.1f} s (broker_timeout={self.broker_timeout:g})")))
        if not self._probing:  # a Future(key) waits for the broker's word, not a cut's end
            self.link.check_attaching(now)
