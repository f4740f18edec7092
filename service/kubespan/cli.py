"""`kubespan` command line: agent, status, check, discovery serve, config, gen."""

from __future__ import annotations

import argparse
import base64
import gc
import json
import logging
import os
import queue
import re
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kubespan import version_text
from kubespan.discovery import limits
from kubespan.errors import ConfigError, KubespanError

if TYPE_CHECKING:
    from kubespan.agent.kernelcache import CachedKernel
    from kubespan.apply.watch import KernelWatcher
    from kubespan.config import MachineConfig

log = logging.getLogger("kubespan")

DEFAULT_STATE_DIR = Path("/var/lib/kubespan")
DEFAULT_RUNTIME_DIR = Path("/run/kubespan")
# sysexits.h EX_CONFIG: the unit does not restart on it, since retrying cannot help.
EXIT_CONFIG = 78


def setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if os.environ.get("JOURNAL_STREAM"):
        fmt = "%(levelname)s %(name)s: %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def cmd_agent(args: argparse.Namespace) -> int:
    from kubespan.agent.events import Stop
    from kubespan.agent.kernelcache import CachedKernel
    from kubespan.agent.loop import Agent
    from kubespan.agent.reflexive import ReflexiveProber
    from kubespan.agent.shutdown import system_powering_off
    from kubespan.agent.statusserver import LatestStatus, StatusServer
    from kubespan.agent.supervisor import ConfigWatcher, Supervisor
    from kubespan.apply.kernel import Kernel
    from kubespan.identity import Identity, load_or_create_identity
    from kubespan.pathcheck.checker import PathChecker
    from kubespan.relay.client import RelayClient
    from kubespan.relay.server import RelayServer

    refused = preflight_refusal(args)
    if refused:
        return refused
    if args.cleanup:
        return cleanup()
    config, raw, watched = agent_config(args)

    events: queue.Queue[Any] = queue.Queue()
    watcher = ConfigWatcher(watched, raw, events)

    def on_stop(signum: int, _frame: object) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        events.put(Stop())

    def on_reload(_signum: int, _frame: object) -> None:
        watcher.trigger()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_reload)

    identities: list[Identity] = []

    def identity() -> Identity:
        if not identities:
            identities.append(load_or_create_identity(args.state_dir))
        return identities[0]

    latest = LatestStatus()
    status_server = StatusServer(args.runtime_dir, latest)
    try:
        status_server.start()
    except OSError as error:
        log.error("cannot serve the status on %s: %s", status_server.path, error)
        return 1
    with Kernel() as netlink, _stopping(status_server):
        # An idle pass reads only WireGuard's peers; the rest is read again when the
        # watcher below reports a change (agent/kernelcache.py).
        kernel = CachedKernel(netlink, time.monotonic)

        def make_agent(config: MachineConfig, node: Identity, queue_: queue.Queue[Any]) -> Agent:
            return Agent(
                config,
                node,
                kernel,
                args.runtime_dir,
                args.state_dir,
                events=queue_,
                stun=ReflexiveProber,
                paths=PathChecker,
                latest=latest,
                relay_client=RelayClient,
                relay_server=RelayServer,
            )

        # Changes to our table, rules, routes, link or any address wake the loop at once
        # (drift is repaired within a pass, not at the next tick). Subscribed before the
        # first pass, so nothing after it goes unnoticed.
        kernel_watcher = watch_kernel(kernel, events)
        kernel_watcher.start()
        kernel.watched_by(lambda: kernel_watcher.subscribed)
        watcher.start()
        freeze_start_up()
        try:
            Supervisor(
                config, kernel, identity, make_agent, events, latest, system_powering_off
            ).run()
        finally:
            watcher.stop()
            kernel_watcher.stop()
    return 0


def freeze_start_up() -> None:
    """What start-up made (modules, classes, functions: most of the process's objects) lives
    as long as the process: out of the cyclic collector's sight, its full collections scan
    only what came since (one every minute or two took 40 ms of CPU in a VM). Garbage
    waiting for a collection is collected first, not kept for good."""
    gc.collect()
    gc.freeze()


def watch_kernel(kernel: CachedKernel, events: queue.Queue[Any]) -> KernelWatcher:
    from kubespan.agent.events import KernelChanged
    from kubespan.apply.watch import KernelWatcher

    def on_kernel_change(reason: str) -> None:
        kernel.invalidate()  # before the event: the pass it wakes must read anew
        events.put(KernelChanged(reason))

    return KernelWatcher(on_kernel_change)


def cleanup() -> int:
    from kubespan.apply.kernel import Kernel

    with Kernel() as kernel:
        removed = kernel.teardown()
    for item in removed:
        log.info("removed %s", item)
    log.info(
        "cleanup done: %s", f"removed {len(removed)} objects" if removed else "nothing of ours"
    )
    return 0


def agent_config(args: argparse.Namespace) -> tuple[MachineConfig, bytes, Path]:
    """The machine config, its bytes, and the file to follow for changes."""
    from kubespan.config.sources import platform_sources, resolve, store_path
    from kubespan.fsutil import readable_by_others

    if args.config is not None:
        raw = read_config_file(args.config)
        config = parse_or_raise(raw, str(args.config))
        log.info("machine config from %s (--config: no other source is asked)", args.config)
        if readable_by_others(args.config):
            log.warning(
                "%s can be read by other users, and it holds the cluster secret: chmod 600 %s",
                args.config,
                args.config,
            )
        return config, raw, args.config
    resolved = resolve(platform_sources(args.runtime_dir), args.state_dir)
    log.info("machine config from %s", resolved.origin)
    return resolved.config, resolved.raw, store_path(args.state_dir)


@contextmanager
def _stopping(server: StatusServerLike) -> Iterator[None]:
    try:
        yield
    finally:
        server.stop()


class StatusServerLike(Protocol):
    def stop(self) -> None: ...


def preflight_refusal(args: argparse.Namespace) -> int:
    """Check what the agent needs before it touches anything: 0, or the exit status after
    one line per missing piece. `--cleanup` needs only the privilege to look (and says so
    rather than reporting "nothing of ours" when it could not look)."""
    from kubespan import preflight

    facts = preflight.gather(args.state_dir)
    found = preflight.missing(facts)
    if args.cleanup:
        privileged = preflight.has_capability(facts.effective_caps, preflight.CAP_NET_ADMIN)
        found = [] if privileged else found[:1]
    for item in found:
        log.error("cannot start: %s", item)
    return preflight.exit_status(found)


def read_config_file(path: Path) -> bytes:
    """The bytes of a config file; `-` is standard input."""
    from kubespan.errors import Problem

    if str(path) == "-":
        return sys.stdin.buffer.read()
    try:
        return path.read_bytes()
    except OSError as error:
        raise ConfigError(
            [Problem(str(path), None, "", f"cannot read: {error.strerror}")]
        ) from None


def parse_or_raise(raw: bytes, label: str) -> MachineConfig:
    from kubespan.config import parse_config

    return parse_config(raw, label)


# `kubespan status` exits 0 when the live agent is ready, 1 when it is not (yet), and 3 (as
# LSB's "program is not running") when no agent answers: what is shown then is the file a
# previous agent left, marked stale.
STATUS_NOT_READY, STATUS_NO_AGENT = 1, 3
AGENT_STATES = {
    "starting": "the agent is starting: no pass has finished yet",
    "disabled": "the agent is idle: kubespan is disabled in the machine config",
}


def cmd_status(args: argparse.Namespace) -> int:
    from kubespan.agent.status import STATUS_FILE, render_status
    from kubespan.agent.statusserver import NoLiveStatus, read_live

    live = True
    try:
        raw = read_live(args.runtime_dir)
        source = "the agent"
    except NoLiveStatus as why:
        live, raw, source = False, b"", str(args.runtime_dir / STATUS_FILE)
        print(f"kubespan: {why}", file=sys.stderr)
        try:
            raw = (args.runtime_dir / STATUS_FILE).read_bytes()
        except FileNotFoundError:
            print("kubespan: and no status file was left: the agent has not run", file=sys.stderr)
            return STATUS_NO_AGENT
        except OSError as error:
            print(f"kubespan: cannot read {source}: {error.strerror}", file=sys.stderr)
            return STATUS_NO_AGENT
    try:
        document = json.loads(raw)
        if not isinstance(document, dict):
            raise ValueError("not a status document")
        agent = document.get("agent")
        if not isinstance(document.get("node"), dict) and agent not in AGENT_STATES:
            raise ValueError("not a status document")
    except ValueError as error:
        print(f"kubespan: the status from {source} is unreadable: {error}", file=sys.stderr)
        return STATUS_NO_AGENT if not live else STATUS_NOT_READY
    document["live"] = live
    if agent in AGENT_STATES:
        print(json.dumps(document, indent=2) if args.json else AGENT_STATES[agent])
        return STATUS_NOT_READY if live else STATUS_NO_AGENT
    if not live:
        if args.json:
            print(json.dumps(document, indent=2))
        else:
            print("STALE: no agent is running; this is what the last one wrote:")
            print(render_status(document))
        return STATUS_NO_AGENT
    show_live_status(document, raw, args)
    return 0 if document.get("ready") else STATUS_NOT_READY


def show_live_status(document: dict[str, Any], raw: bytes, args: argparse.Namespace) -> None:
    from kubespan.agent.status import render_status
    from kubespan.diagnose.report import check_line

    if not args.no_check:
        document["check"] = status_check(args.runtime_dir, raw)
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(render_status(document))
        if not args.no_check:
            print(check_line(document["check"]))


def status_check(runtime_dir: Path, raw: bytes) -> dict[str, object]:
    """`kubespan check` summarised for `kubespan status`, on the report already read; the
    status is shown whatever happens to the check."""
    from kubespan import preflight
    from kubespan.diagnose import diagnose
    from kubespan.diagnose.observe import observe
    from kubespan.diagnose.report import check_summary
    from kubespan.diagnose.statusread import read_report

    caps = preflight.effective_capabilities()
    if not preflight.has_capability(caps, preflight.CAP_NET_ADMIN):
        return {"summary": "not run: it needs root (CAP_NET_ADMIN)", "findings": []}
    try:
        return check_summary(diagnose(observe(runtime_dir, report=read_report(raw))))
    except Exception as error:
        log.debug("the check failed", exc_info=True)
        return {"summary": f"not run: {type(error).__name__}: {error}"[:300], "findings": []}


def cmd_check(args: argparse.Namespace) -> int:
    """Self-diagnosis: exit 0 with no error found, 1 with any, 77 without the privilege to
    look (rules, routes and the agent's status can be read without it, nftables cannot)."""
    from kubespan import preflight
    from kubespan.diagnose import diagnose
    from kubespan.diagnose.observe import observe
    from kubespan.diagnose.report import findings_json, render_findings

    caps = preflight.effective_capabilities()
    if not preflight.has_capability(caps, preflight.CAP_NET_ADMIN):
        print("kubespan: check needs root (CAP_NET_ADMIN) to read nftables", file=sys.stderr)
        return preflight.EXIT_NOPERM
    findings = diagnose(observe(args.runtime_dir))
    print(findings_json(findings) if args.json else render_findings(findings))
    return 1 if any(finding.severity == "error" for finding in findings) else 0


def cmd_discovery_serve(args: argparse.Namespace) -> int:
    from kubespan.discovery.daemon import UsageError

    try:
        return _discovery_serve(args)
    except UsageError as error:
        print(f"kubespan: {error}", file=sys.stderr)
        return 2


def _discovery_serve(args: argparse.Namespace) -> int:
    """Every flag is checked, the TLS key loaded and the sockets bound before the service
    says it is listening; each mistake is one line and exit status 2 (1 for the system's)."""
    from kubespan.discovery import daemon
    from kubespan.discovery.http import HttpLimits
    from kubespan.discovery.server import Settings
    from kubespan.discovery.snapshot import StateDirError
    from kubespan.discovery.state import Quotas

    listen = daemon.parse_listen(args.listen, "--listen")
    metrics = None
    if args.metrics_listen is not None:
        metrics = daemon.parse_listen(args.metrics_listen, "--metrics-listen")
    proxies, names = _proxies_and_names(args)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise daemon.UsageError("--tls-cert and --tls-key go together")
    tls = None
    if args.tls_cert is not None:
        tls = daemon.tls_context(args.tls_cert, args.tls_key)
    http_limits = daemon.descriptor_budget(
        HttpLimits(
            max_connections=args.max_connections,
            max_per_source=args.max_connections_per_source,
        )
    )
    quotas = Quotas(
        max_affiliates=args.max_affiliates,
        max_stored_bytes=args.max_stored_mib * 1024 * 1024,
        new_clusters_per_hour=args.new_clusters_per_hour,
    )
    stun = daemon.stun_sockets(listen, args.stun_listen, args.stun_advertise, args.no_stun)
    sockets = list(stun.sockets)
    try:
        for address, flag in ((listen, "--listen"), (metrics, "--metrics-listen")):
            if address is not None:
                try:
                    sockets.append(daemon.bind(address.host, address.port))
                except OSError as error:
                    raise daemon.UsageError(
                        f"{flag} {address.host}:{address.port}: cannot listen: {error.strerror}"
                    ) from None
        served = sockets[len(stun.sockets) :]
        api_socket, ops_socket = served[0], (served[1] if metrics is not None else None)
        bound_port = api_socket.getsockname()[1]
        settings = Settings(
            state_dir=args.state_dir,
            rate=args.rate_limit,
            burst=max(args.burst, 1.0),
            trusted_proxies=proxies,
            snapshot_interval=args.snapshot_interval,
            services=tuple(names) or daemon.default_names(listen, bound_port),
            quotas=quotas,
            http=http_limits,
            stun=stun.adverts,
        )
        try:
            return daemon.serve(settings, listen, api_socket, ops_socket, tls, stun.sockets)
        except StateDirError as error:
            print(f"kubespan: --state-dir: {error}", file=sys.stderr)
            return 1
    finally:
        for sock in sockets:
            sock.close()


def _proxies_and_names(args: argparse.Namespace) -> tuple[tuple[Any, ...], list[str]]:
    import ipaddress

    from kubespan.discovery import limits
    from kubespan.discovery.daemon import UsageError
    from kubespan.discovery.signing import canonical_authority

    try:
        proxies = tuple(ipaddress.ip_network(p, strict=False) for p in args.trusted_proxy)
    except ValueError as error:
        raise UsageError(f"--trusted-proxy: {error}") from None
    names: list[str] = []
    for url in args.public_url:
        try:
            names.append(canonical_authority(url))
        except ValueError as error:
            raise UsageError(f"--public-url {url!r}: {error}") from None
    if len(names) > limits.MAX_PUBLIC_NAMES:
        raise UsageError(f"--public-url: at most {limits.MAX_PUBLIC_NAMES} names")
    return proxies, names


def _number(kind: type[float] | type[int], low: float, high: float) -> Any:
    """An argparse type: ASCII decimal in [low, high] (float() would take "nan" and "1e9")."""

    def parse(text: str) -> float | int:
        if not re.fullmatch(r"[0-9]{1,12}" + (r"(\.[0-9]{1,6})?" if kind is float else ""), text):
            raise argparse.ArgumentTypeError(f"{text!r} is not a plain decimal number")
        value = kind(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is not between {low:g} and {high:g}")
        return value

    return parse


def cmd_config_validate(args: argparse.Namespace) -> int:
    from kubespan.config import load_config

    failed = False
    for file in args.files:
        try:
            load_config(Path(file))
        except ConfigError as error:
            failed = True
            for problem in error.problems:
                print(problem, file=sys.stderr)
        else:
            print(f"{file}: valid")
    return 1 if failed else 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from kubespan.config.render import effective_document, to_yaml
    from kubespan.config.sources import store_path

    path = args.file or store_path(args.state_dir)
    config = parse_or_raise(read_config_file(path), str(path))
    print(f"# effective machine config of {path}, defaults filled in")
    print(to_yaml(effective_document(config)), end="")
    return 0


def cmd_config_apply(args: argparse.Namespace) -> int:
    from kubespan.config.sources import store_path
    from kubespan.fsutil import atomic_write, ensure_private_dir

    raw = read_config_file(args.file)
    label = "<stdin>" if str(args.file) == "-" else str(args.file)
    parse_or_raise(raw, label)
    store = store_path(args.state_dir)
    ensure_private_dir(store.parent)
    atomic_write(store, raw, mode=0o600)
    print(f"{label}: valid; stored as {store}; the running agent applies it within seconds")
    return 0


def new_cluster_identity() -> tuple[str, str]:
    return (
        base64.b64encode(os.urandom(32)).decode(),
        base64.b64encode(os.urandom(32)).decode(),
    )


def cmd_gen_cluster(_args: argparse.Namespace) -> int:
    cluster_id, secret = new_cluster_identity()
    print(f"id: {cluster_id}")
    print(f"secret: {secret}")
    return 0


def cmd_gen_config(args: argparse.Namespace) -> int:
    import yaml

    from kubespan.config.interpret import decode_key32, parse_service_url
    from kubespan.config.render import new_config_document, to_yaml

    try:
        url = parse_service_url(args.discovery)
    except ValueError as error:
        print(f"kubespan: --discovery: {error}", file=sys.stderr)
        return 2
    if args.cluster is None:
        cluster_id, secret = new_cluster_identity()
    else:
        try:
            document = yaml.safe_load(args.cluster.read_text())
            cluster_id, secret = str(document["id"]), str(document["secret"])
            decode_key32(cluster_id)
            decode_key32(secret)
        except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as error:
            print(
                f"kubespan: --cluster {args.cluster}: expected the output of "
                f"`kubespan gen cluster` (id and secret): {error}",
                file=sys.stderr,
            )
            return 2
    print(to_yaml(new_config_document(url, cluster_id, secret)), end="")
    return 0


# The numeric flags of `discovery serve`: flag, type, lowest, highest, default, metavar, help.
_SERVE_NUMBERS: tuple[tuple[str, type[float] | type[int], float, float, float, str, str], ...] = (
    ("--rate-limit", float, 0, 1e6, limits.RATE_PER_SOURCE, "PER_S",
     "requests per second per source, an IPv4 address or IPv6 /64 (0: no limit)"),
    ("--burst", float, 1, 1e6, limits.BURST_PER_SOURCE, "N", "burst per source"),
    ("--max-connections", int, 16, 1_000_000, limits.MAX_CONNECTIONS, "N", "connections in all"),
    ("--max-connections-per-source", int, 1, 1_000_000, limits.MAX_CONNECTIONS_PER_SOURCE, "N",
     "connections from one IPv4 address or IPv6 /64 (trusted proxies: unlimited)"),
    ("--max-affiliates", int, 1, 10_000_000, limits.MAX_AFFILIATES_TOTAL, "N",
     "affiliates of all clusters"),
    ("--max-stored-mib", int, 1, 1_000_000, limits.MAX_STORED_BYTES >> 20, "MIB",
     "blob bytes held (data and endpoints) for all clusters together"),
    ("--new-clusters-per-hour", float, 0, 1e6, limits.NEW_CLUSTERS_PER_SOURCE_PER_HOUR, "N",
     "clusters one source may create per hour (0: no limit)"),
    ("--snapshot-interval", float, 0.1, 86400, limits.SNAPSHOT_INTERVAL_SECONDS, "S",
     "seconds between snapshots"),
)  # fmt: skip


def add_serve_parser(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the discovery service",
        description="The discovery service. Deployment, TLS, proxies, HA and backups: "
        "docs/discovery.md.",
    )
    serve.add_argument("--listen", default="127.0.0.1:3000", help="ADDRESS:PORT of the API")
    serve.add_argument(
        "--public-url",
        action="append",
        default=[],
        metavar="URL",
        help="a URL nodes use to reach this service (repeatable); requests must be signed for "
        "one of them. Default: the --listen address (required when it is a wildcard)",
    )
    serve.add_argument(
        "--metrics-listen",
        default=None,
        metavar="ADDRESS:PORT",
        help="serve /healthz, /readyz and /metrics here (default: not at all; never on the API)",
    )
    serve.add_argument(
        "--state-dir", type=Path, default=None, help="where to keep snapshots (default: memory)"
    )
    serve.add_argument(
        "--trusted-proxy",
        action="append",
        default=[],
        metavar="CIDR",
        help="believe X-Forwarded-For from these addresses, and only these (repeatable)",
    )
    serve.add_argument(
        "--stun-listen",
        action="append",
        default=[],
        metavar="ADDRESS:PORT",
        help="answer STUN binding requests on this UDP address (repeatable). Default: the "
        f"--listen address, port {limits.STUN_DEFAULT_PORT}, skipped with a warning if taken",
    )
    serve.add_argument(
        "--stun-advertise",
        action="append",
        default=[],
        metavar="[ADDRESS]:PORT",
        help="a STUN reflector to name to nodes (repeatable; `:PORT` is this service's own "
        "address as the node reached it). Default: `:PORT` for each --stun-listen port",
    )
    serve.add_argument(
        "--no-stun", action="store_true", help="no STUN reflector, and none advertised"
    )
    serve.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate")
    serve.add_argument("--tls-key", type=Path, help="the certificate's private key")
    for flag, kind, low, high, default, metavar, text in _SERVE_NUMBERS:
        serve.add_argument(
            flag, type=_number(kind, low, high), default=default, metavar=metavar, help=text
        )
    serve.set_defaults(func=cmd_discovery_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubespan", description="Encrypted node mesh over kernel WireGuard."
    )
    parser.add_argument("--version", action="version", version=version_text())
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    agent = commands.add_parser("agent", help="run the node agent (the kubespan service)")
    agent.add_argument(
        "--config",
        type=Path,
        default=None,
        help="run with exactly this file (default: the image's config sources, see README)",
    )
    agent.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    agent.add_argument("--runtime-dir", type=Path, default=DEFAULT_RUNTIME_DIR)
    agent.add_argument(
        "--cleanup",
        action="store_true",
        help="remove everything kubespan created in the kernel (link, table, rules, routes), exit",
    )
    agent.set_defaults(func=cmd_agent)

    status = commands.add_parser("status", help="show this node and its peers")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--no-check",
        action="store_true",
        help="leave out the summary of `kubespan check` (cheaper, for frequent polling)",
    )
    status.add_argument("--runtime-dir", type=Path, default=DEFAULT_RUNTIME_DIR)
    status.set_defaults(func=cmd_status)

    check = commands.add_parser(
        "check",
        help="find what keeps kubespan from working on this node, and say what to do",
        description="Conflicting rules, marks and routes, rp_filter, the tunnel MTU against "
        "each path to a peer, the clock and discovery. Exit 0: no error found; 1: errors; "
        "77: not root.",
    )
    check.add_argument("--json", action="store_true", help="the findings as a JSON list")
    check.add_argument("--runtime-dir", type=Path, default=DEFAULT_RUNTIME_DIR)
    check.set_defaults(func=cmd_check)

    discovery = commands.add_parser("discovery", help="the discovery service")
    discovery_commands = discovery.add_subparsers(dest="discovery_command", required=True)
    add_serve_parser(discovery_commands)

    config = commands.add_parser("config", help="machine config tools")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    validate = config_commands.add_parser("validate", help="check machine config files")
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.set_defaults(func=cmd_config_validate)
    show = config_commands.add_parser(
        "show", help="the effective config, defaults filled in, secret redacted"
    )
    show.add_argument("file", nargs="?", type=Path, metavar="FILE", help="default: the node's")
    show.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    show.set_defaults(func=cmd_config_show)
    apply = config_commands.add_parser(
        "apply", help="validate FILE and make it this node's config (the agent follows)"
    )
    apply.add_argument("file", type=Path, metavar="FILE", help="- reads standard input")
    apply.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    apply.set_defaults(func=cmd_config_apply)

    gen = commands.add_parser("gen", help="generate identities and configs")
    gen_commands = gen.add_subparsers(dest="gen_command", required=True)
    cluster = gen_commands.add_parser("cluster", help="print a new cluster id and secret")
    cluster.set_defaults(func=cmd_gen_cluster)
    gen_config = gen_commands.add_parser("config", help="print a machine config with kubespan on")
    gen_config.add_argument("--discovery", required=True, metavar="URL", help="discovery service")
    gen_config.add_argument(
        "--cluster", type=Path, metavar="FILE", help="id and secret from `kubespan gen cluster`"
    )
    gen_config.set_defaults(func=cmd_gen_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        result: int = args.func(args)
    except ConfigError as error:
        if args.func is not cmd_agent:
            for problem in error.problems:
                print(problem, file=sys.stderr)
            return 1
        for problem in error.problems:
            log.error("invalid machine config: %s", problem)
        return EXIT_CONFIG
    except KubespanError as error:
        log.error("%s", error)
        return 1
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
