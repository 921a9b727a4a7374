"""The ``zmqexec`` command line: broker, worker (agent), status, keygen.

Exit codes: 0 ok, 1 runtime error or unreachable, 2 usage or refused configuration.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import sys
import time
import uuid
from typing import Any, Dict, Optional, Sequence, Tuple

from ._version import __version__

log = logging.getLogger(__name__)
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def is_loopback(address: str) -> bool:
    """True for ipc/inproc and tcp on 127.0.0.0/8, ::1 or localhost; False for all else."""
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp" or not rest:
        return False
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # '*', interface names and host names are not loopback
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is loopback too
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _logging_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log at INFO level")
    common.add_argument("--log-level", choices=LEVELS, type=str.upper,
                        default=argparse.SUPPRESS, help="log level (default WARNING)")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _logging_options()
    parser = argparse.ArgumentParser(
        prog="zmqexec", parents=[common],
        description="Run a zmqexec cluster: a broker, worker agents on any number of\n"
                    "machines, and clients that connect with ZMQExecutor(address=...).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example, one machine:\n"
               "  zmqexec keygen ~/zx\n"
               "  zmqexec broker --bind tcp://127.0.0.1:5555 --keys ~/zx &\n"
               "  zmqexec worker tcp://127.0.0.1:5555 --keys ~/zx &\n"
               "  zmqexec status tcp://127.0.0.1:5555 --keys ~/zx --watch\n"
               "then, in Python: ZMQExecutor(address='tcp://127.0.0.1:5555', keys='~/zx')\n\n"
               "exit codes: 0 ok (also after SIGTERM/SIGINT), 1 runtime error or no\n"
               "answer, 2 usage or refused configuration")
    parser.add_argument("--version", action="version", version=f"zmqexec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("broker", parents=[common], help="run a broker",
                       description="Run a broker. It prints 'zmqexec broker listening on "
                                   "ADDR' once bound.")
    p.add_argument("--bind", action="append", metavar="ADDR",
                   help="address to listen on, repeatable (default tcp://127.0.0.1:5555; "
                        "port 0 picks a free port)")
    p.add_argument("--keys", metavar="DIR", help="CurveZMQ key directory")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback address without keys (anyone who can reach "
                        "it can run code on every worker)")
    p.add_argument("--max-queued-bytes", type=int, default=4 << 30, metavar="N",
                   help="bytes of queued task payloads the broker accepts (default 4 GiB)")
    p.add_argument("--max-held-bytes", type=int, default=1 << 30, metavar="N",
                   help="bytes of results held for clients (default 1 GiB; oldest dropped)")
    p.add_argument("--max-frame", type=int, default=256 << 20, metavar="N",
                   help="largest payload frame in bytes (default 256 MiB); announced to "
                        "peers, which refuse larger arguments and results up front")
    p.add_argument("--max-message", type=int, default=4 << 30, metavar="N",
                   help="largest task or result in bytes (default 4 GiB)")
    p.add_argument("--client-timeout", type=float, metavar="S",
                   help="drop a client silent this long (default: what the client asks, "
                        "at least 60 s)")

    p = sub.add_parser("worker", parents=[common], help="run a worker agent",
                       description="Run an agent that connects to a broker and runs tasks "
                                   "in N task processes. Task output goes to this "
                                   "process's stdout/stderr.")
    p.add_argument("address", metavar="ADDRESS", help="the broker, e.g. tcp://host:5555")
    p.add_argument("--nprocs", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="task processes (default: number of CPUs)")
    p.add_argument("--keys", metavar="DIR", help="CurveZMQ key directory")
    p.add_argument("--name", help="name of this agent (and of its key pair)")
    p.add_argument("--drain-timeout", type=float, default=60.0, metavar="S",
                   help="seconds running tasks may finish after SIGTERM")
    p.add_argument("--max-tasks-per-child", type=int, metavar="N",
                   help="replace a task process after it ran N tasks (default: never)")
    p.add_argument("--heartbeat-interval", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--heartbeat-timeout", type=float, default=10.0, help=argparse.SUPPRESS)
    p.add_argument("--prefetch", type=int, help=argparse.SUPPRESS)

    p = sub.add_parser("status", parents=[common], help="show a broker's status",
                       description="Show a broker's agents and task counts.")
    p.add_argument("address", metavar="ADDRESS")
    p.add_argument("--json", action="store_true", help="print the status document as JSON")
    p.add_argument("--watch", action="store_true", help="refresh until interrupted")
    p.add_argument("--keys", metavar="DIR", help="CurveZMQ key directory")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S",
                   help="seconds to wait for the broker (default 5)")

    p = sub.add_parser("keygen", parents=[common], help="create CurveZMQ keys")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--client", action="append", metavar="NAME")
    p.add_argument("--worker", action="append", metavar="NAME")
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    level = getattr(args, "log_level", None) or ("INFO" if getattr(args, "verbose", False)
                                                 else "WARNING")
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")


def _peer_keys(role: str, directory: Optional[str], name: Optional[str] = None) -> Any:
    """The key triple for ``--keys DIR`` (None without), or exit code 2 with a message."""
    if not directory:
        return None
    from .wire.curve import KeysError, peer_keys

    try:
        return peer_keys(directory, role, name)
    except KeysError as exc:
        sys.stderr.write(f"zmqexec: {exc}\n")
        return 2


def run_broker(args: argparse.Namespace) -> int:
    from .broker.loop import Broker
    from .broker.state import BrokerState

    binds = args.bind or ["tcp://127.0.0.1:5555"]
    exposed = [b for b in binds if not is_loopback(b)]
    keys = None
    if args.keys:
        from .wire.curve import BrokerKeys, KeysError

        try:
            keys = BrokerKeys(args.keys)
        except KeysError as exc:
            sys.stderr.write(f"zmqexec broker: {exc}\n")
            return 2
    elif exposed and not args.insecure:
        sys.stderr.write(
            f"zmqexec broker: refusing to listen on {', '.join(exposed)} without keys: "
            "anyone who can reach it could run code on every worker. Bind a loopback "
            "address (tcp://127.0.0.1:PORT), or pass --insecure on a network you trust.\n")
        return 2
    if exposed and keys is None:
        log.warning("INSECURE: listening on %s without keys: anyone who can reach it can "
                    "run code on every worker", ", ".join(exposed))
    elif keys is None and any(b.startswith("tcp") for b in binds):
        log.warning("no keys: every local user can submit tasks to this broker")
    state = BrokerState(max_held_bytes=args.max_held_bytes,
                        max_queued_bytes=args.max_queued_bytes,
                        client_timeout=args.client_timeout, max_frame=args.max_frame,
                        max_message=args.max_message)
    if keys is not None:
        state.key_roles = keys.role_of
    try:
        broker = Broker(binds, state=state, keys=keys)
    except Exception as exc:
        sys.stderr.write(f"zmqexec broker: cannot bind {', '.join(binds)}: {exc}\n")
        return 1
    broker.install_signal_handlers()
    for addr in broker.addresses:
        sys.stdout.write(f"zmqexec broker listening on {addr}\n")
    sys.stdout.flush()
    broker.run()
    return 0


def run_worker(args: argparse.Namespace) -> int:
    from .agent.loop import Agent

    keys = _peer_keys("worker", args.keys, args.name)
    if isinstance(keys, int):
        return keys
    if args.nprocs < 1:
        sys.stderr.write("zmqexec worker: --nprocs must be at least 1\n")
        return 2
    if args.max_tasks_per_child is not None and args.max_tasks_per_child < 1:
        sys.stderr.write("zmqexec worker: --max-tasks-per-child must be at least 1\n")
        return 2
    agent = Agent(args.address, args.nprocs, name=args.name, prefetch=args.prefetch,
                  heartbeat_interval=args.heartbeat_interval,
                  heartbeat_timeout=args.heartbeat_timeout,
                  drain_timeout=args.drain_timeout, keys=keys,
                  max_tasks_per_child=args.max_tasks_per_child)
    signal.signal(signal.SIGTERM, agent.drain)
    signal.signal(signal.SIGINT, agent.stop)
    agent.run()
    return 1 if agent.refused else 0


def fetch_status(address: str, timeout: float, keys: Any = None) -> Optional[Dict[str, Any]]:
    """Ask a broker for its status document; None if it does not answer in time."""
    import zmq

    from .wire import protocol as P
    from .wire.curve import apply_client

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IPV6, 1)
    if keys is not None:
        apply_client(sock, keys)
    try:
        sock.connect(address)
        hello = {"role": "status", "id": uuid.uuid4().hex, "proto": P.PROTOCOL_VERSION,
                 "zmqexec": __version__, "ttl": max(timeout, 3.0)}
        sock.send_multipart(P.encode(P.HELLO, hello))
        sock.send_multipart(P.encode(P.STATUS, {}))
        end = time.monotonic() + timeout
        while sock.poll(max(0, int((end - time.monotonic()) * 1000))):
            msg = P.decode(sock.recv_multipart())
            if msg.cmd == P.STATUS:
                sock.send_multipart(P.encode(P.BYE, {"reason": "status done"}))
                return msg.meta
            if msg.cmd == P.REFUSE:
                raise RuntimeError(msg.meta["reason"])
        return None
    finally:
        sock.close()
        ctx.term()


def format_status(doc: Dict[str, Any], rate: Optional[float] = None) -> str:
    """The plain-text view of a status document; ``rate``: tasks/s done since the last
    view (``--watch``), else the average since the broker started."""
    t = doc["tasks"]
    done = t["finished"] + t["error"] + t["lost"]
    uptime = doc["broker"]["uptime"]
    if rate is None:
        rate = done / uptime if uptime > 0 else 0.0
    lines = [f"broker zmqexec {doc['broker']['version']}  up {uptime:.0f} s  "
             f"clients {doc['clients']}  slots {doc['slots']}  {rate:,.0f} tasks/s",
             "tasks  " + "  ".join(f"{k} {t[k]}" for k in
                                   ("queued", "running", "finished", "error", "cancelled",
                                    "lost")),
             f"held   {doc['held_keys']} results, {doc['held_bytes']:,} bytes "
             f"({doc.get('pinned_bytes', 0):,} needed by tasks); queued "
             f"{doc['queued_bytes']:,} bytes"
             + ("; new submits held back until those tasks ran" if doc.get("holding")
                else ""),
             f"agents {len(doc['agents'])}"]
    for a in doc["agents"]:
        lines.append(f"  {a['name']:<24} {a['host']:<16} pid {a['pid']!s:<7} slots "
                     f"{a['slots']:<3} running {a['running']:<3} finished {a['finished']:<6} "
                     f"heartbeat {a['last_heartbeat']:.1f} s ago")
    shared = doc.get("shared") or {}
    if shared.get("variables") or shared.get("queues"):
        lines.append(f"shared {shared['variables']} variables, {shared['queues']} queues "
                     f"({shared['queued_items']} items queued)")
    if doc.get("dropped"):
        lines.append("dropped " + ", ".join(f"{k}: {v}" for k, v in doc["dropped"].items()))
    return "\n".join(lines)


def run_status(args: argparse.Namespace) -> int:
    keys = _peer_keys("client", args.keys)
    if isinstance(keys, int):
        return keys
    last: Optional[Tuple[float, int]] = None  # (when, tasks done) of the previous view
    while True:
        try:
            doc = fetch_status(args.address, args.timeout, keys)
        except RuntimeError as exc:
            sys.stderr.write(f"zmqexec status: {exc}\n")
            return 1
        if doc is None:
            sys.stderr.write(f"zmqexec status: no answer from {args.address} within "
                             f"{args.timeout:g} s\n")
            return 1
        now, t = time.monotonic(), doc["tasks"]
        done = t["finished"] + t["error"] + t["lost"]
        rate = (done - last[1]) / max(now - last[0], 1e-9) if last else None
        last = (now, done)
        text = json.dumps(doc, indent=2) if args.json else format_status(doc, rate)
        if args.watch:
            sys.stdout.write("\x1b[H\x1b[2J")
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        if not args.watch:
            return 0
        time.sleep(1.0)


def run_keygen(args: argparse.Namespace) -> int:
    from .wire.curve import KeysError, keygen

    try:
        written, kept = keygen(args.dir, args.client or (), args.worker or ())
    except (KeysError, OSError) as exc:
        sys.stderr.write(f"zmqexec keygen: {exc}\n")
        return 2
    for path in written:
        sys.stdout.write(f"wrote {path} and {path[:-len('_secret')]}\n")
    for path in kept:
        sys.stdout.write(f"kept  {path} (never overwritten)\n")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    commands = {"broker": run_broker, "worker": run_worker, "status": run_status,
                "keygen": run_keygen}
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        return 0
