"""The one way every loop reads its ZeroMQ socket: up to a batch of messages per wake-up.

Reading stops when the socket says it holds no more (``EVENTS``, cheaper than a receive
that raises ``zmq.Again``) or after ``RECV_BATCH`` messages, so timers and the other side
of the loop get a turn under a flood.
"""
from __future__ import annotations

from typing import Any, Iterator, List

import zmq

# plain ints: ``int & zmq.POLLIN`` (an IntFlag) builds an enum member, 1.5 us a message
EVENTS, POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
RECV_BATCH = 1000  # messages read per wake-up at most


def received(sock: "zmq.Socket[Any]") -> Iterator[List[Any]]:
    """The messages waiting on ``sock`` (frames as ``zmq.Frame``, not copied)."""
    for _ in range(RECV_BATCH):
        try:
            frames: List[Any] = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        yield frames
        if not int(sock.getsockopt(EVENTS)) & POLLIN:
            return
