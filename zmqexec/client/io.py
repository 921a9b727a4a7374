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
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple

import zmq

from .._version import __version__
from ..errors import BrokenZMQExecutor, BrokerLostError, ZMQExecError
from ..wire import protocol as P
from ..wire import serialization as S
from ..wire.curve import apply_client
from ..wire.sockets import received
from .items import Broken, Close
from .link import Link, request_status
from .state import ClientState
from .threads import Completions, Mailbox

log = logging.getLogger(__name__)


class ClientIO:
    """The threads and socket of one executor's connection to a broker."""

    def __init__(self, address: str, blobs: Dict[str, bytes], *,
                 heartbeat_interval: float, broker_timeout: float,
                 attach_timeout: float, no_workers_timeout: Optional[float] = None,
                 keys: Optional[Tuple[bytes, bytes, bytes]] = None) -> None:
        self.address = address
        self.interval = heartbeat_interval
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

    def _io_main(self) -> None:
        ctx = zmq.Context()
        self._sock = sock = ctx.socket(zmq.DEALER)
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
        link, mailbox = self.link, self.mailbox
        now = self._last_heard = self._last_sent = time.monotonic()
        next_check = now
        try:
            sock.connect(self.address)
            self._hello()
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(mailbox.wake_fd, zmq.POLLIN)
            while True:
                events = dict(poller.poll(int(min(self.interval, 0.1) * 1000)))
                link.apply(mailbox.take(mailbox.wake_fd in events))
                if sock in events:
                    for frames in received(sock):
                        self._on_frames(frames)
                    link.pump()  # answers freed window space
                now = time.monotonic()
                if now - self._last_sent >= self.interval:
                    if link.window:
                        self._send(P.HEARTBEAT, {})
                    else:  # not welcomed yet: our HELLO may have found no connection
                        self._hello()
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
            sock.close(linger=200)
            ctx.term()
            self.completions.close()
            link.close_waiters()

    def _on_frames(self, frames: List[Any]) -> None:
        try:
            msg = P.decode(frames)
        except ZMQExecError as exc:
            log.warning("dropped a malformed message from the broker: %s", exc)
            return
        self._last_heard = time.monotonic()
        self.link.on_message(msg)

    def _timers(self, now: float) -> None:
        if now - self._last_heard > self.broker_timeout and self.state.broken is None:
            self.defer(Broken(BrokerLostError(
                f"no word from the broker at {self.address} for "
                f"{now - self._last_heard:.1f} s (broker_timeout={self.broker_timeout:g})")))
        self.link.check_attaching(now)

