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
from typing import Any, List, Optional, Sequence

import zmq

from .state import BrokerState

log = logging.getLogger(__name__)
# plain ints: ``int & zmq.POLLIN`` (an IntFlag) builds an enum member, 1.5 us a message
EVENTS, POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
RECV_BATCH = 1000  # messages handled per wake-up before timers and sends get a turn
PACK_SLACK = 32 << 20  # a frame of small parts packed together may pass max_frame by this


class Broker:
    """A ROUTER socket bound to one or more addresses, driving a BrokerState."""

    def __init__(self, binds: Sequence[str], *, state: Optional[BrokerState] = None,
                 parent_fd: Optional[int] = None, tick: float = 0.05,
                 keys: Optional[Any] = None) -> None:
        self.state = state or BrokerState()
        self.parent_fd = parent_fd
        self.tick_interval = tick
        self._stop = False
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if any("[" in addr for addr in binds):  # an IPv6 literal; else keep IPv4 endpoints
            self.sock.setsockopt(zmq.IPV6, 1)
        self.sock.setsockopt(zmq.SNDHWM, 0)  # bounded by credit windows, never by drops
        self.sock.setsockopt(zmq.RCVHWM, 0)
        # the last line of defence: senders check the announced caps first, so only a
        # peer that ignores them is disconnected (with room for a frame of packed parts)
        self.sock.setsockopt(zmq.MAXMSGSIZE, self.state.limits["max_frame"] + PACK_SLACK)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.keys = keys  # keys.BrokerKeys: CurveZMQ, and the role of each peer's key
        if keys is not None:
            keys.apply(self.ctx, self.sock)
        self.addresses: List[str] = []
        for addr in binds:
            self.sock.bind(addr)
            self.addresses.append(self.sock.getsockopt_string(zmq.LAST_ENDPOINT))

    def stop(self, *_: Any) -> None:
        """Ask the loop to end (safe from a signal handler)."""
        self._stop = True

    def install_signal_handlers(self, ignore_sigint: bool = False) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, signal.SIG_IGN if ignore_sigint else self.stop)

    def run(self) -> None:
        """Serve until stopped, the parent goes away, or a signal arrives."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        if self.parent_fd is not None:
            poller.register(self.parent_fd, zmq.POLLIN)
        state, sock = self.state, self.sock
        next_tick = 0.0
        try:
            while not self._stop:
                events = dict(poller.poll(int(self.tick_interval * 1000)))
                now = time.monotonic()
                if sock in events:
                    for _ in range(RECV_BATCH):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        state.handle(frames[0].bytes, frames[1:], now,
                                     str(frames[0].get("User-Id")) if self.keys else None)
                        if not int(sock.getsockopt(EVENTS)) & POLLIN:
                            break  # cheaper than a recv that raises zmq.Again
                if self.parent_fd is not None and self.parent_fd in events:
                    log.info("parent process is gone: stopping")
                    break
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
        for ident, frames in self.state.flush():
            try:
                self.sock.send_multipart([ident, *frames], zmq.NOBLOCK, copy=False)
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EHOSTUNREACH:  # it left (a client after its BYE): routine
                    self.state.dropped["send failed: peer unreachable"] += 1
                    log.debug("peer %s is gone: message dropped", ident.hex()[:8])
                else:
                    self.state.drop(f"send failed: {exc}", ident)

