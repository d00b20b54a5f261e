"""``supervisor``: the command line of an autovn node.

supervisor start FILE          run the node in the foreground until SIGINT/SIGTERM
supervisor stop FILE           stop the node started from FILE
supervisor status FILE         node, workers, rings, peers  [--json]
supervisor logs FILE           filter and follow the node's log
supervisor check-config FILE   print the effective settings, or every error (exit 1)
supervisor dht get FILE KEY    look KEY up in the DHT: its records and where they are kept
supervisor dht put FILE KEY V  create KEY with value V (text, or hex with --hex), signed by
                               this node (a tool for tests: records others may refuse)
supervisor netcheck FILE       the node's NAT picture: local, reflexive and mapped endpoints
supervisor ping FILE PEER      probe the link to PEER (a name, a virtual address, a node id):
                               the path (direct endpoint, or relayed via which node), the RTT
supervisor map FILE            crawl the overlay through the overlay and draw its circle: SVG
                               (map.svg, or --svg PATH), --png PATH (optional cairosvg), --json
supervisor demo                a small network in namespaces on this machine
supervisor ca init DIR         make a network authority: DIR/ca.key (0600), DIR/ca.crt
supervisor cert issue ...      sign a node's public key for some networks
supervisor cert show FILE      print a certificate's fields and whether it is valid now
supervisor key show FILE       print this node's public key and node id (creating the key)
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import zmq

from pipeline import messages
from pipeline.config import Settings, check_files, load_settings
from pipeline.crypto.keyfiles import KeyFileError, node_membership
from pipeline.errors import ConfigError
from pipeline.worker import CLI_SOCKET, CONTROL_SOCKET, endpoint

EXIT_CONFIG = 1
EXIT_NOT_RUNNING = 3


def version() -> str:
    """autovn's version: the installed package's, else the source tree's pyproject.toml."""
    from importlib import metadata  # only for --version: `supervisor start` need not load it

    try:
        return metadata.version("autovn")
    except metadata.PackageNotFoundError:
        pass
    try:
        with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as f:
            return str(tomllib.load(f)["project"]["version"]) + " (source tree)"
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


def _load(path: Path, *, files: bool = False) -> Settings:
    """The settings of ``path``, or every problem on stderr and exit 1. ``files``: also the
    files the node needs (``check_files``)."""
    try:
        settings = load_settings(path)
        if files:
            check_files(settings)
        return settings
    except ConfigError as exc:
        print(f"{path}: {len(exc.problems)} problem(s)", file=sys.stderr)
        for key, msg in exc.problems:
            print(f"  {key}: {msg}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args.file, files=True)
    print(settings.to_json())
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    from supervisor.node import NodeError, NodeSupervisor, spawn_mode
    from supervisor.template import fork_template

    # The worker template first, before any thread or ZeroMQ context: its imports of the
    # stages run while the settings load and the supervisor sets up. It exits with us.
    template = fork_template() if spawn_mode() == "template" else None
    settings = _load(args.file, files=True)
    sec = settings.security
    if sec.insecure_plaintext:
        print(
            "WARNING: security.insecure_plaintext: frames cross the underlay unencrypted and "
            "unauthenticated; use this only to measure the pipeline",
            file=sys.stderr,
        )
    else:
        try:
            node_membership(settings, time.time())
        except KeyFileError as exc:
            print(f"cannot start: {exc}", file=sys.stderr)
            return 1
    try:
        return NodeSupervisor(settings, template).run()
    except NodeError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 1


def _running_pid(settings: Settings) -> int | None:
    """The supervisor's pid if the node runs (its lock is held), else None."""
    runtime = settings.node.runtime_dir
    try:
        fd = os.open(runtime / "supervisor.lock", os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        try:
            return int((runtime / "supervisor.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None
    finally:
        os.close(fd)


def cmd_stop(args: argparse.Namespace) -> int:
    settings = _load(args.file)
    pid = _running_pid(settings)
    if pid is None:
        print(f"node {settings.node.name} is not running", file=sys.stderr)
        return EXIT_NOT_RUNNING
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if _running_pid(settings) is None:
            print(f"node {settings.node.name} stopped")
            return 0
        time.sleep(0.1)
    print(
        f"node {settings.node.name} (pid {pid}) did not stop in {args.timeout} s", file=sys.stderr
    )
    return 1


def query_status(settings: Settings, timeout_s: float = 3.0) -> dict[str, Any] | None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint(settings.node.runtime_dir, CLI_SOCKET))
        sock.send(messages.encode(messages.StatusRequest()))
        if not sock.poll(int(timeout_s * 1000)):
            return None
        reply = messages.decode(sock.recv())
    finally:
        sock.close(0)
    return reply.status if isinstance(reply, messages.StatusReply) else None


def cmd_status(args: argparse.Namespace) -> int:
    settings = _load(args.file)
    name = settings.node.name
    status = query_status(settings) if _running_pid(settings) is not None else None
    if status is not None:
        from supervisor.status import format_status

        print(json.dumps(status, indent=2) if args.json else format_status(status))
        return 0
    running = _running_pid(settings) is not None
    state = "not answering" if running else "not running"
    if args.json:  # a script reads stdout: it gets JSON whatever the state
        print(json.dumps({"node": name, "running": running, "state": state}, indent=2))
    else:
        print(f"node {name} is {state}", file=sys.stderr)
    return 1 if running else EXIT_NOT_RUNNING


def _ask_control(args: argparse.Namespace, request: messages.Message) -> messages.Message | int:
    """Send ``request`` to the running node's control worker; its answer, or an exit code."""
    settings = _load(args.file)
    if _running_pid(settings) is None:
        print(f"node {settings.node.name} is not running", file=sys.stderr)
        return EXIT_NOT_RUNNING
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint(settings.node.runtime_dir, CONTROL_SOCKET))
        sock.send(messages.encode(request))
        if not sock.poll(int(args.timeout * 1000)):
            print(f"node {settings.node.name} did not answer in {args.timeout} s", file=sys.stderr)
            return 1
        return messages.decode(sock.recv())
    finally:
        sock.close(0)


def cmd_dht_put(args: argparse.Namespace) -> int:
    try:
        value = bytes.fromhex(args.value) if args.hex else args.value.encode()
    except ValueError:
        print(f"not hex: {args.value!r}", file=sys.stderr)
        return 1
    reply = _ask_control(args, messages.DhtPutRequest(args.key, value, args.lease))
    if isinstance(reply, int):
        return reply
    if not isinstance(reply, messages.DhtPutReply):
        print("unexpected answer from control", file=sys.stderr)
        return 1
    holder = f" (held by {reply.holder})" if reply.holder else ""
    print(f"key {reply.key!r}: {'created' if reply.ok else 'not created'} ({reply.reason}){holder}")
    return 0 if reply.ok else 2


def cmd_dht_get(args: argparse.Namespace) -> int:
    reply = _ask_control(args, messages.DhtGetRequest(args.key))
    if isinstance(reply, int):
        return reply
    if not isinstance(reply, messages.DhtGetReply):
        print("unexpected answer from control", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(msgspec.to_builtins(reply), indent=2))
    else:
        print(format_dht_reply(reply))
    return 0 if reply.ok and reply.records else 2


def format_dht_reply(reply: messages.DhtGetReply) -> str:
    found = "found" if reply.records else "no record"
    lines = [f"key {reply.key!r}: {found} ({reply.reason})", f"position {reply.position}"]
    for r in reply.records:
        value = r.value.hex() if not r.value.isascii() or len(r.value) == 20 else r.value.decode()
        lines.append(
            f"  value {value}  owner {r.owner_id}  seq {r.seq}  lease {r.lease_s:g} s"
            + ("  (deleted)" if r.deleted else "")
        )
    lines.append("kept on (the nodes nearest the key, as this node sees them):")
    lines += [f"  {n}" for n in reply.replicas]
    return "\n".join(lines)


def cmd_ping(args: argparse.Namespace) -> int:
    """Like ``tailscale ping``: a probe a line, the path each took, and a line when the path
    changes. Exit 0 if any probe was answered."""
    settings = _load(args.file)
    if _running_pid(settings) is None:
        print(f"node {settings.node.name} is not running", file=sys.stderr)
        return EXIT_NOT_RUNNING
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    answered = 0
    last_path: tuple[str, str] | None = None
    try:
        sock.connect(endpoint(settings.node.runtime_dir, CONTROL_SOCKET))
        for seq in range(args.count):
            started = time.monotonic()
            sock.send(messages.encode(messages.PingRequest(args.peer, seq)))
            reply = _ping_reply(sock, seq, started + args.timeout)
            if reply is None:
                print(f"{args.peer}: no answer in {args.timeout:g} s")
            else:
                answered += reply.ok
                lines, last_path = ping_lines(args.peer, reply, last_path)
                print("\n".join(lines))
            pause = args.interval - (time.monotonic() - started)
            if seq + 1 < args.count and pause > 0:
                time.sleep(pause)
    finally:
        sock.close(0)
    return 0 if answered else 1


def ping_lines(
    peer: str, reply: messages.PingReply, last_path: tuple[str, str] | None
) -> tuple[list[str], tuple[str, str] | None]:
    """The lines ``supervisor ping`` prints for ``reply`` (a line for the path change
    first, if the path is not ``last_path``), and the path to compare the next with."""
    if not reply.ok:
        return [f"{peer}: {reply.reason.replace('_', ' ')}"], last_path
    path = (reply.path, reply.endpoint)
    lines = []
    if last_path is not None and path != last_path:
        lines.append(f"path changed: {_path_text(*last_path)} -> {_path_text(*path)}")
    lines.append(f"pong from {reply.node} {_path_text(*path)} in {reply.rtt_ms:.3f} ms")
    return lines, path


def _ping_reply(sock: Any, seq: int, deadline: float) -> messages.PingReply | None:
    while (left := deadline - time.monotonic()) > 0:
        if not sock.poll(int(left * 1000) + 1):
            return None
        try:
            reply = messages.decode(sock.recv())
        except ValueError:
            continue
        if isinstance(reply, messages.PingReply) and reply.seq == seq:
            return reply
    return None


def _path_text(path: str, where: str) -> str:
    if path == "direct":
        return f"direct via {where}"
    return f"relayed via node {where[:16]}" if where else "relayed"


def cmd_netcheck(args: argparse.Namespace) -> int:
    reply = _ask_control(args, messages.NetcheckRequest())
    if isinstance(reply, int):
        return reply
    if not isinstance(reply, messages.NetcheckReply):
        print("unexpected answer from control", file=sys.stderr)
        return 1
    picture = reply.picture
    if args.json:
        print(json.dumps(picture, indent=2))
    else:
        print(format_netcheck(picture))
    return 0


def format_netcheck(picture: dict[str, Any]) -> str:
    """The NAT picture for a human: where the node is, and how others see it."""
    if not picture.get("encrypted"):
        return "plaintext mode: no links, no NAT traversal"
    mapping = picture.get("port_mapping") or {}
    stun = picture.get("stun") or {}
    varies = picture.get("mapping_varies")
    lines = [
        f"local endpoints     {', '.join(picture.get('local') or []) or '-'}",
        f"default gateway     {picture.get('gateway') or '-'}",
        f"reflexive (STUN)    {picture.get('reflexive') or '-'}",
        f"reflexive (overlay) {picture.get('overlay_reflexive') or '-'}",
    ]
    for server, seen in (stun.get("answers") or {}).items():
        lines.append(f"  {server:<20} sees {seen}")
    for server, why in (stun.get("failed") or {}).items():
        lines.append(f"  {server:<20} {why}")
    if varies is None:
        verdict = "unknown (fewer than two STUN answers)"
    else:
        verdict = "yes: the NAT maps per destination (hard to punch)" if varies else "no"
    lines.append(f"mapping varies      {verdict}")
    if mapping.get("enabled"):
        answered = mapping.get("protocol") or "none answered"
        lifetime = mapping.get("lifetime_s")
        if mapping.get("external") and lifetime is not None:
            answered += ", permanent" if lifetime == 0 else f", lease {lifetime} s"
        lines.append(f"port mapping        {mapping.get('external') or '-'} ({answered})")
        if mapping.get("protocols"):
            lines.append(f"  asks               {', '.join(mapping['protocols'])}, in this order")
    else:
        lines.append("port mapping        off")
    lines.append(f"candidates          {', '.join(picture.get('candidates') or []) or '-'}")
    for slot, path in (picture.get("shortcuts") or {}).items():
        where = path.get("endpoint") or "relayed"
        how = ", birthday probing" if path.get("birthday") else ""
        lines.append(f"  link {slot}: {path.get('phase')} {where} (round {path.get('round')}{how})")
    return "\n".join(lines)


def cmd_map(args: argparse.Namespace) -> int:
    """Crawl the overlay from the running node (control does it, through the overlay) and
    draw it: the SVG always (``--svg``, default map.svg here), a PNG if asked and cairosvg is
    there, the crawl as JSON (``--json``) or as text."""
    from supervisor import mapview

    request = messages.MapRequest(args.max_nodes, args.timeout)
    args.timeout += 5.0  # control answers when the crawl ends: at its deadline at the latest
    reply = _ask_control(args, request)
    if isinstance(reply, int):
        return reply
    if not isinstance(reply, messages.MapReply):
        print("unexpected answer from control", file=sys.stderr)
        return 1
    found = reply.map
    if "error" in found:
        print(mapview.format_map(found), file=sys.stderr)
        return 1
    say = sys.stderr if args.json else sys.stdout
    print(json.dumps(found, indent=2) if args.json else mapview.format_map(found))
    svg = mapview.render_svg(found)
    path = args.svg if args.svg is not None else Path("map.svg")
    try:
        path.write_text(svg)
    except OSError as exc:
        print(f"cannot write {path}: {exc}", file=sys.stderr)
        return 1
    print(f"map written to {path.resolve()}", file=say)
    if args.png is not None:
        why = mapview.write_png(svg, args.png)
        if why is not None:
            print(why, file=sys.stderr)
            return 1
        print(f"PNG written to {args.png.resolve()}", file=say)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from supervisor import logview

    settings = _load(args.file)
    return logview.run(args, settings.log_file, sys.stdout)


def cmd_demo(args: argparse.Namespace) -> int:
    from supervisor.testbed.demo import run_demo

    return run_demo(seconds=args.seconds, pings=args.pings, nodes=args.nodes, map_path=args.map)


def whole_number(lo: int, hi: int | None = None) -> Any:
    """An argparse type: a whole number from ``lo`` (to ``hi``), with a message that says so."""

    def parse(text: str) -> int:
        want = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be a whole number {want}, got {text!r}"
            ) from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {want}, got {value}")
        return value

    return parse


def seconds(text: str) -> float:
    """An argparse type: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


class _VersionAction(argparse.Action):
    """``--version``: the version is looked up only when asked for (``importlib.metadata``
    alone costs a node's start 20 ms)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(f"supervisor (autovn) {version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    from supervisor import keys, logview  # their commands' modules: not for `start`

    parser = argparse.ArgumentParser(
        prog="supervisor", description="Run and inspect an autovn node."
    )
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, fn: Any, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("file", type=Path, help="the node's TOML configuration")
        p.set_defaults(fn=fn)
        return p

    command("start", cmd_start, "run the node in the foreground until SIGINT/SIGTERM")
    stop = command("stop", cmd_stop, "stop the running node")
    stop.add_argument(
        "--timeout", type=seconds, default=20.0, help="seconds to wait (default: %(default)s)"
    )
    status = command("status", cmd_status, "show the node, its workers, rings and peers")
    status.add_argument("--json", action="store_true", help="print JSON")
    logs = command("logs", cmd_logs, "show the node's log, filtered; --follow to keep reading")
    logview.add_arguments(logs)
    command("check-config", cmd_check_config, "validate FILE and print the effective settings")
    ping = command("ping", cmd_ping, "probe the link to a peer: its path and RTT, probe by probe")
    ping.add_argument("peer", help="a node name, a virtual address or a node id (hex)")
    ping.add_argument("-c", "--count", type=int, default=10, help="probes (default: %(default)s)")
    ping.add_argument(
        "-i", "--interval", type=seconds, default=1.0, help="seconds apart (default: %(default)s)"
    )
    ping.add_argument(
        "--timeout",
        type=seconds,
        default=2.0,
        help="seconds to wait a probe (default: %(default)s)",
    )
    netcheck = command(
        "netcheck",
        cmd_netcheck,
        "show the node's NAT picture: local, reflexive (STUN) and port-mapped endpoints, "
        "whether its NAT maps per destination, its shortcut attempts",
    )
    netcheck.add_argument(
        "--timeout", type=seconds, default=10.0, help="seconds to wait (default: %(default)s)"
    )
    netcheck.add_argument("--json", action="store_true", help="print JSON")
    crawl = command(
        "map",
        cmd_map,
        "crawl the overlay from this node, through the overlay (each node lists its "
        "connections, signed), and draw the circle as SVG",
    )
    crawl.add_argument(
        "--max-nodes",
        type=whole_number(1, 10_000),
        default=200,
        help="ask at most this many nodes; beyond, the map is a sample (default: %(default)s)",
    )
    crawl.add_argument(
        "--timeout",
        type=seconds,
        default=20.0,
        help="seconds the crawl may take (default: %(default)s)",
    )
    crawl.add_argument("--json", action="store_true", help="print the crawl as JSON")
    crawl.add_argument(
        "--svg", type=Path, default=None, help="write the SVG here (default: ./map.svg)"
    )
    crawl.add_argument(
        "--png", type=Path, default=None, help="also a PNG (needs the extra autovn[map])"
    )
    dht = sub.add_parser("dht", help="ask the running node's DHT")
    dht_sub = dht.add_subparsers(dest="dht_command", required=True)
    get = dht_sub.add_parser("get", help="show a key's records and the nodes that keep them")
    get.add_argument("file", type=Path, help="the node's TOML configuration")
    get.add_argument("key", help="e.g. ip:<namespace>:<address>")
    get.add_argument(
        "--timeout", type=seconds, default=10.0, help="seconds to wait (default: %(default)s)"
    )
    get.add_argument("--json", action="store_true", help="print JSON")
    get.set_defaults(fn=cmd_dht_get)
    put = dht_sub.add_parser("put", help="create a record signed by this node (for tests)")
    put.add_argument("file", type=Path, help="the node's TOML configuration")
    put.add_argument("key")
    put.add_argument("value", help="text, or hex digits with --hex")
    put.add_argument("--hex", action="store_true", help="the value is hex digits")
    put.add_argument(
        "--lease", type=seconds, default=300.0, help="lease in seconds (default: %(default)s)"
    )
    put.add_argument(
        "--timeout", type=seconds, default=10.0, help="seconds to wait (default: %(default)s)"
    )
    put.set_defaults(fn=cmd_dht_put)
    demo = sub.add_parser(
        "demo",
        help="run a small network in namespaces on this machine, measure it, remove it",
        description="Build nodes on two routed segments in network namespaces, each with a "
        "DHCP client on its TAP, ping every node by name, run iperf3 across the segments, "
        "print a table, and remove everything (needs root, dhclient, ping, dig, iperf3).",
    )
    demo.add_argument(
        "--nodes", type=whole_number(2, 20), default=5, help="nodes, 2 to 20 (default: %(default)s)"
    )
    demo.add_argument(
        "--seconds",
        type=whole_number(0, 3600),
        default=3,
        help="iperf3 time, 0 for none (default: %(default)s)",
    )
    demo.add_argument(
        "--pings",
        type=whole_number(1, 10000),
        default=20,
        help="pings per node (default: %(default)s)",
    )
    demo.add_argument(
        "--map", type=Path, default=None, help="save the demo network's map (SVG) here"
    )
    demo.set_defaults(fn=cmd_demo)
    keys.add_commands(sub)
    return parser


def _start_args(argv: list[str]) -> argparse.Namespace | None:
    """``start FILE`` as ``build_parser`` would parse it, without building the parser (its
    fourteen commands cost a node's start 10 ms); None for any other command line."""
    if len(argv) == 2 and argv[0] == "start" and argv[1] and not argv[1].startswith("-"):
        return argparse.Namespace(command="start", file=Path(argv[1]), fn=cmd_start)
    return None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = _start_args(argv) or build_parser().parse_args(argv)
    try:
        code = args.fn(args)
    except KeyboardInterrupt:  # Ctrl-C in a command that does not handle it: no traceback
        code = 128 + signal.SIGINT
    sys.exit(code)
