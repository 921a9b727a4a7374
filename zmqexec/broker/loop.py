"""The broker's socket loop: one ROUTER, one screen of code, all decisions in BrokerState.

::

    clients (DEALER) --SUBMIT/INFORM/RELEASE/CANCEL-->+
                                                      |  Broker.run()
    agents  (DEALER) --HELLO/STARTED/RESULT/DEATH---->+  recv -> BrokerState.handle()
                                                      |  tick -> BrokerState.tick()
              <--TASK/CANCEL/HEARTBEAT/WELCOME--------+  BrokerState.out -> send
    clients   <--STATE/RESULT/HEARTBEAT---------------+

Sends are non-blocking with ``ROUTER_MANDATORY`` on, so a vanished peer raises instead of
being dropped silently and no peer can block the loop; such drops are counted.
"""
from __future__ import annotations

import logging
import signal
import time
from typing import Any, List, Optional, Sequence, Tuple

import zmq

from ..wire.sockets import received
from .state import BrokerState

log = logging.getLogger(__name__)
# plain ints: ``int & zmq.POLLIN`` (an IntFlag) builds an enum member, 1.5 us a message
EVENTS, POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
RECV_BATCH = 1000  # messages handled per wake-up before timers and sends get a turn
PACK_SLACK = 32 << 20  # a frame of small parts packed together may pass max_frame by this


class Broker:
    """A ROUTER socket bound to one or more addresses, driving a BrokerState."""

    def __init__(self, binds: Sequence[str], *, state: Optional[BrokerState] = None,
                 tick: float = 0.05, keys: Optional[Any] = None) -> None:
        self.state = state or BrokerState()
        self.tick_interval = tick
        self._stop = False
        self.ctx = zmq.Context()
        self.keys = keys  # curve.BrokerKeys: CurveZMQ, and the role of each peer's key
        self.sock, self.addresses = router(self.ctx, binds, self.state, keys)

    def stop(self, *_: Any) -> None:
        """Ask the loop to end (safe from a signal handler)."""
        self._stop = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self) -> None:
        """Serve until stopped or a signal arrives."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        state, sock = self.state, self.sock
        next_tick = 0.0
        try:
            while not self._stop:
                events = dict(poller.poll(int(self.tick_interval * 1000)))
                now = time.monotonic()
                if sock in events:
                    for frames in received(sock):
                        state.handle(frames[0].bytes, frames[1:], now,
                                     str(frames[0].get("User-Id")) if self.keys else None)
                if now >= next_tick:
                    state.tick(now)
                    next_tick = now + self.tick_interval
                self._flush()
            state.shutdown("broker stopping")
            self._flush()
        finally:
            self.sock.close()
            if self.keys is not None:
                self.keys.stop()
            self.ctx.term()
            log.info("broker stopped")

    def _flush(self) -> None:
        send_all(self.sock, self.state)


def router(ctx: "zmq.Context[Any]", binds: Sequence[str], state: BrokerState,
           keys: Optional[Any] = None) -> Tuple["zmq.Socket[Any]", List[str]]:
    """The broker's ROUTER, bound to ``binds``: the socket and its real addresses."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    if any("[" in addr for addr in binds):  # an IPv6 literal; else keep IPv4 endpoints
        sock.setsockopt(zmq.IPV6, 1)
    sock.setsockopt(zmq.SNDHWM, 0)  # bounded by credit windows, never by drops
    sock.setsockopt(zmq.RCVHWM, 0)
    # the last line of defence: senders check the announced caps first, so only a
    # peer that ignores them is disconnected (with room for a frame of packed parts)
    sock.setsockopt(zmq.MAXMSGSIZE, state.limits["max_frame"] + PACK_SLACK)
    sock.setsockopt(zmq.LINGER, 1000)
    if keys is not None:
        keys.apply(ctx, sock)
    addresses: List[str] = []
    for addr in binds:
        sock.bind(addr)
        addresses.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    return sock, addresses


def send_all(sock: "zmq.Socket[Any]", state: BrokerState) -> int:
    """Send what the state decided, never blocking; a peer that is gone is counted.
    Returns how many messages were tried (a send may change the socket's EVENTS)."""
    out = state.flush()
    for ident, frames in out:
        try:
            sock.send_multipart([ident, *frames], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:  # it left (a client after its BYE): routine
                state.dropped["send failed: peer unreachable"] += 1
                log.debug("peer %s is gone: message dropped", ident.hex()[:8])
            else:
                state.drop(f"send failed: {exc}", ident)
    return len(out)
