"""`kubespan discovery serve` as a process: flags turned into sockets and settings (every
mistake one clear line, before anything is logged as listening), the listeners, signals and a
clean stop.

A clean stop (SIGTERM, SIGINT): stop accepting, answer every open long poll at once (with
what the watcher already has, so it simply polls again, elsewhere or after the restart),
let requests in flight finish, write the final snapshot (marked clean, with the nonces of
the replay window), log one line, exit 0.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import resource
import signal
import socket
import ssl
from dataclasses import dataclass, replace
from pathlib import Path

from kubespan import notify
from kubespan.discovery import limits
from kubespan.discovery.http import HttpLimits, HttpServer, tune_loop
from kubespan.discovery.server import DiscoveryApp, Settings, exempt_from_source_limits
from kubespan.discovery.signing import authority
from kubespan.discovery.stunserver import StunAdvert, StunListener, bind_udp

log = logging.getLogger(__name__)

_PORT = re.compile(r"[0-9]{1,5}", re.ASCII)


class UsageError(Exception):
    """A flag that cannot work; the message is the one line the user sees."""


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    @property
    def wildcard(self) -> bool:
        return ipaddress.ip_address(self.host).is_unspecified


def parse_listen(text: str, flag: str) -> Address:
    """`IPv4:PORT` or `[IPv6]:PORT`, port 0 to 65535 (0: any free port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not _PORT.fullmatch(port) or int(port) > 65535:
        raise UsageError(f"{flag} {text!r}: expected ADDRESS:PORT with a port from 0 to 65535")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        raise UsageError(
            f"{flag} {text!r}: {host!r} is not an IP address (IPv6 goes in brackets)"
        ) from None
    if address.version == 6 and not host.startswith("["):
        raise UsageError(f"{flag} {text!r}: write an IPv6 address in brackets, [{address}]")
    return Address(str(address), int(port))


def parse_stun_advert(text: str) -> StunAdvert:
    """`:PORT` (the address clients reach the service at), `IPv4:PORT` or `[IPv6]:PORT`."""
    flag = "--stun-advertise"
    if text.startswith(":"):
        if not _PORT.fullmatch(text[1:]) or not 1 <= int(text[1:]) <= 65535:
            raise UsageError(f"{flag} {text!r}: expected :PORT with a port from 1 to 65535")
        return StunAdvert(None, int(text[1:]))
    address = parse_listen(text, flag)
    if address.wildcard or address.port == 0:
        raise UsageError(f"{flag} {text!r}: name an address clients can reach and a port")
    return StunAdvert(address.host, address.port)


@dataclass(frozen=True)
class StunSockets:
    sockets: tuple[socket.socket, ...]
    adverts: tuple[StunAdvert, ...]


def stun_sockets(
    listen: Address, stun_listen: list[str], advertise: list[str], disabled: bool
) -> StunSockets:
    """Bind the STUN reflector's sockets. Named addresses must bind (UsageError otherwise);
    the default (the API's host, port 3478, or any free port when the API's is 0) is
    given up with a warning when taken, e.g. by a second service on this host. Unless
    --stun-advertise says otherwise, each bound port is advertised at the service's address."""
    if disabled:
        if stun_listen or advertise:
            raise UsageError("--no-stun leaves nothing to --stun-listen or --stun-advertise")
        return StunSockets((), ())
    adverts = tuple(dict.fromkeys(parse_stun_advert(text) for text in advertise))
    if len(adverts) > limits.MAX_STUN_ADVERTS:
        raise UsageError(f"--stun-advertise: at most {limits.MAX_STUN_ADVERTS} reflectors")
    named = [parse_listen(text, "--stun-listen") for text in stun_listen]
    wanted = named or [Address(listen.host, limits.STUN_DEFAULT_PORT if listen.port else 0)]
    sockets: list[socket.socket] = []
    try:
        for address in dict.fromkeys(wanted):
            try:
                sockets.append(bind_udp(address.host, address.port))
            except OSError as error:
                if named:
                    raise UsageError(
                        f"--stun-listen {address.host}:{address.port}: cannot listen: "
                        f"{error.strerror}"
                    ) from None
                log.warning(
                    "no STUN reflector: udp %s:%d: %s (choose one with --stun-listen, or "
                    "--no-stun)",
                    address.host,
                    address.port,
                    error.strerror,
                )
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    if not adverts:
        ports = dict.fromkeys(int(sock.getsockname()[1]) for sock in sockets)
        adverts = tuple(StunAdvert(None, port) for port in ports)
    return StunSockets(tuple(sockets), adverts)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        # `[::]` serves IPv4 too, whatever the system default; IPv4 clients then appear as
        # ::ffff:a.b.c.d, which forwarded.unmap turns back into a.b.c.d.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """Load the certificate and key now, so a mismatch is a startup error, not a failure
    of every handshake after "listening" was logged."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # A client that renegotiates makes the server sign again and again on one connection.
    context.options |= ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(str(cert), str(key))
    except FileNotFoundError as error:
        raise UsageError(f"--tls-cert/--tls-key: {error.filename}: no such file") from None
    except ssl.SSLError as error:
        reason = error.reason or str(error)
        raise UsageError(
            f"--tls-cert {cert} / --tls-key {key}: cannot be used together ({reason})"
        ) from None
    except OSError as error:
        raise UsageError(f"--tls-cert/--tls-key: {error.strerror}") from None
    return context


def descriptor_budget(http_limits: HttpLimits) -> HttpLimits:
    """Raise the soft descriptor limit to the hard one, and keep the connection limit below
    it, so accept() never fails for want of a descriptor (which would stall the listener
    and fail snapshots with EMFILE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    room = soft - limits.FD_RESERVE - limits.MAX_METRICS_CONNECTIONS
    if http_limits.max_connections <= room:
        return http_limits
    if room < 16:
        raise UsageError(f"the descriptor limit ({soft}) is too low to serve; raise it")
    log.warning(
        "connection limit lowered from %d to %d by the descriptor limit %d; raise it "
        "(LimitNOFILE=) to serve more",
        http_limits.max_connections,
        room,
        soft,
    )
    return replace(http_limits, max_connections=room)


def default_names(listen: Address, bound_port: int) -> tuple[str, ...]:
    if listen.wildcard:
        raise UsageError(
            f"--listen {listen.host}:{listen.port} is every address of this host: name the "
            "service with --public-url URL (the URL nodes are given; repeatable)"
        )
    return (authority(listen.host, bound_port),)


async def run_service(
    app: DiscoveryApp,
    api_socket: socket.socket,
    ops_socket: socket.socket | None,
    tls: ssl.SSLContext | None,
    stop: asyncio.Event,
    stun: tuple[socket.socket, ...] = (),
) -> tuple[int, bool]:
    """Serve until `stop` is set; then stop cleanly. The number of long polls answered and
    whether the final snapshot was written."""
    settings = app.settings
    api = HttpServer(
        app.handle,
        settings.http,
        exempt=exempt_from_source_limits(settings.trusted_proxies),
        ssl_context=tls,
        name="api",
    )
    ops_limits = replace(
        settings.http,
        max_connections=limits.MAX_METRICS_CONNECTIONS,
        max_per_source=limits.MAX_METRICS_CONNECTIONS,
    )
    ops = HttpServer(app.handle_ops, ops_limits, name="metrics")
    app.transports = [api, ops]
    await app.start()
    await api.listen(api_socket)
    if ops_socket is not None:
        await ops.listen(ops_socket)
    reflectors = [StunListener(sock, app.stun) for sock in stun]
    for reflector in reflectors:
        reflector.start()
    await stop.wait()
    for reflector in reflectors:
        reflector.close()
    api.closing = True  # answers from now on close their connections
    woken = app.wake_all()
    await api.close(limits.SHUTDOWN_GRACE_SECONDS)
    saved = await app.stop()
    await ops.close(0.5)
    return woken, saved


def serve(
    settings: Settings,
    listen: Address,
    api_socket: socket.socket,
    ops_socket: socket.socket | None,
    tls: ssl.SSLContext | None,
    stun: tuple[socket.socket, ...] = (),
) -> int:
    """Run the service until SIGTERM/SIGINT; the process's exit status."""
    app = DiscoveryApp.open(settings)
    host, port = api_socket.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    metrics = "off"
    if ops_socket is not None:
        ops_host, ops_port = ops_socket.getsockname()[:2]
        metrics = f"http://{f'[{ops_host}]' if ':' in ops_host else ops_host}:{ops_port}"
    if settings.state_dir is None:
        log.warning("no --state-dir: state is in memory only and lost at every restart")
    reflectors = ",".join(_shown(sock) for sock in stun) or "off"
    log.info("stun reflector udp=%s advertised=%s", reflectors, _adverts(settings.stun))
    log.info(
        "discovery service listening url=%s://%s:%d pid=%d metrics=%s names=%s",
        "https" if tls else "http",
        shown,
        port,
        os.getpid(),
        metrics,
        ",".join(settings.services),
    )
    loop = tune_loop()
    asyncio.set_event_loop(loop)
    stop = asyncio.Event()
    received: list[str] = []

    def on_signal(signum: int) -> None:
        received.append(signal.Signals(signum).name)
        notify.notify("STOPPING=1")
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    notify.ready(f"serving {listen.host}:{port}")
    try:
        woken, saved = loop.run_until_complete(
            run_service(app, api_socket, ops_socket, tls, stop, stun)
        )
    finally:
        loop.close()
    if settings.state_dir is not None and not saved:
        log.error("stopped signal=%s; the final snapshot could not be written", received[:1])
        return 1
    log.info(
        "stopped cleanly signal=%s long_polls_answered=%d snapshot=%s",
        received[0] if received else "-",
        woken,
        "written" if saved else "none (memory only)",
    )
    return 0


def _shown(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _adverts(adverts: tuple[StunAdvert, ...]) -> str:
    shown = [f"{a.address or ''}:{a.port}" if a.address is None or ":" not in a.address
             else f"[{a.address}]:{a.port}" for a in adverts]  # fmt: skip
    return ",".join(shown) or "none"
