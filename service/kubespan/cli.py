"""`kubespan` command line: agent, status, discovery serve, config validate, gen."""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import queue
import signal
import sys
from pathlib import Path
from typing import Any

from kubespan import __version__
from kubespan.errors import ConfigError, KubespanError

log = logging.getLogger("kubespan")

DEFAULT_STATE_DIR = Path("/var/lib/kubespan")
DEFAULT_RUNTIME_DIR = Path("/run/kubespan")
DEFAULT_CONFIG = Path("/etc/kubespan/machineconfig.yaml")
# sysexits.h EX_CONFIG: the unit does not restart on it, since retrying cannot help.
EXIT_CONFIG = 78


def setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if os.environ.get("JOURNAL_STREAM"):
        fmt = "%(levelname)s %(name)s: %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    logging.getLogger("pyroute2").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def cmd_agent(args: argparse.Namespace) -> int:
    from kubespan.agent.loop import Agent, Stop, run_disabled
    from kubespan.apply.kernel import Kernel
    from kubespan.config import load_config
    from kubespan.identity import load_or_create_identity

    config = load_config(args.config)
    events: queue.Queue[Any] = queue.Queue()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        events.put(Stop())

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with Kernel() as kernel:
        if not config.kubespan.enabled:
            run_disabled(kernel, events)
            return 0
        identity = load_or_create_identity(args.state_dir)
        agent = Agent(config, identity, kernel, args.runtime_dir)
        agent.events = events
        for session in agent.sessions:
            session.events = events
        agent.run()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from kubespan.agent.status import STATUS_FILE, render_status

    path = args.runtime_dir / STATUS_FILE
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        print(f"kubespan: no status at {path}: is the agent running?", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:
        print(f"kubespan: cannot read {path}: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(render_status(document))
    return 0


def cmd_discovery_serve(args: argparse.Namespace) -> int:
    from kubespan.discovery.server import bind, serve

    host, sep, port = args.listen.rpartition(":")
    if not sep or not port.isdigit():
        print(f"kubespan: --listen {args.listen!r}: expected HOST:PORT", file=sys.stderr)
        return 2
    try:
        sock = bind(host.strip("[]"), int(port))
    except OSError as error:
        print(f"kubespan: cannot listen on {args.listen}: {error.strerror}", file=sys.stderr)
        return 1
    serve(sock, args.state_dir)
    return 0


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


def cmd_gen_cluster(_args: argparse.Namespace) -> int:
    print(f"id: {base64.b64encode(os.urandom(32)).decode()}")
    print(f"secret: {base64.b64encode(os.urandom(32)).decode()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubespan", description="Encrypted node mesh over kernel WireGuard."
    )
    parser.add_argument("--version", action="version", version=f"kubespan {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    agent = commands.add_parser("agent", help="run the node agent (the kubespan service)")
    agent.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="machine config file")
    agent.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    agent.add_argument("--runtime-dir", type=Path, default=DEFAULT_RUNTIME_DIR)
    agent.set_defaults(func=cmd_agent)

    status = commands.add_parser("status", help="show this node and its peers")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--runtime-dir", type=Path, default=DEFAULT_RUNTIME_DIR)
    status.set_defaults(func=cmd_status)

    discovery = commands.add_parser("discovery", help="the discovery service")
    discovery_commands = discovery.add_subparsers(dest="discovery_command", required=True)
    serve = discovery_commands.add_parser("serve", help="run the discovery service")
    serve.add_argument("--listen", default="127.0.0.1:3000", help="HOST:PORT to listen on")
    serve.add_argument("--state-dir", type=Path, default=None, help="where to keep snapshots")
    serve.set_defaults(func=cmd_discovery_serve)

    config = commands.add_parser("config", help="machine config tools")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    validate = config_commands.add_parser("validate", help="check machine config files")
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.set_defaults(func=cmd_config_validate)

    gen = commands.add_parser("gen", help="generate identities and configs")
    gen_commands = gen.add_subparsers(dest="gen_command", required=True)
    cluster = gen_commands.add_parser("cluster", help="print a new cluster id and secret")
    cluster.set_defaults(func=cmd_gen_cluster)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        result: int = args.func(args)
    except ConfigError as error:
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
