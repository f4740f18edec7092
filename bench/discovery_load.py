"""Load on the discovery service, as it runs in production (its own process).

Prints `name=value` lines:

  updates_per_s         signed PUTs that change an affiliate, one cluster, 32 connections
  updates_per_s_many    the same spread over 1,000 clusters
  updates_ratio_many_to_one
  notify_p50_ms         from a change to each of 1,000 long-polling watchers having the news
  notify_p99_ms
  bytes_per_member      resident memory the service grows by per member, beyond the member's
                        own data (10,000 members of 10 clusters)
  updates_ratio_under_slowloris
                        signed updates per second with 1,000 slow-header connections open
                        (from 1,000 loopback addresses, reopened as the service drops them),
                        over the same without
  healthz_p99_ms_under_slowloris
                        /healthz (the metrics listener) answered while they are open
  hello_p99_ms_under_slowloris
                        a signed hello on the API port itself while they are open
  stored_mib, healthz_max_ms_during_snapshots
                        the largest /healthz answer time while the service writes snapshots
                        of 6,000 maximal affiliates (4 KiB data, 64 endpoints of 128 bytes)
                        every 0.5 s: snapshots are written off the event loop

The load generator shares the machine (2 cores here): requests are signed before the timed
window, and watchers are read with epoll, so the client measures the service, not itself.
"""

from __future__ import annotations

import asyncio
import base64
import json
import multiprocessing
import os
import re
import resource
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvloop

from kubespan.crypto import ClusterKeys
from kubespan.discovery.signing import sign

CONNECTIONS = 32
UPDATES = 6000
WATCHERS = 1000
MEMBERS = 10_000
DATA = 320  # bytes of sealed affiliate data, about what a node with a few addresses sends
ENDPOINT = 41  # bytes of one sealed endpoint
KUBESPAN = Path(sys.executable).parent / "kubespan"


SERVICE_URL = "http://127.0.0.1:{port}"
METRICS_PORT: dict[int, int] = {}  # API port -> metrics port of the running service


@contextmanager
def service(*extra: str) -> Iterator[tuple[str, int, int]]:
    """(host, port, pid) of a fresh service without per-source rate limits (the load comes
    from one address)."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log"
        argv = [
            str(KUBESPAN),
            "discovery",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--rate-limit",
            "0",
            "--new-clusters-per-hour",
            "0",
            *(arg.replace("{tmp}", tmp) for arg in extra),
        ]
        with log.open("wb") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        pattern = r"url=http://([\d.]+):(\d+) pid=(\d+) metrics=http://[\d.]+:(\d+)"
        try:
            deadline = time.monotonic() + 20
            while not (match := re.search(pattern, log.read_text())):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(log.read_text())
                time.sleep(0.05)
            host, port = match.group(1), int(match.group(2))
            METRICS_PORT[port] = int(match.group(4))
            while True:
                try:
                    socket.create_connection((host, port), 1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            global SERVICE_URL  # noqa: PLW0603 - one service at a time; requests name it
            SERVICE_URL = f"http://{host}:{port}"
            yield host, port, process.pid
        finally:
            process.terminate()
            process.wait(timeout=15)


def request_bytes(keys: ClusterKeys, method: str, target: str, body: bytes) -> bytes:
    headers = sign(
        keys.signing_key,
        method,
        target,
        body,
        int(time.time()),
        os.urandom(16),
        service_url=SERVICE_URL,
    )
    lines = [f"{method} {target} HTTP/1.1", "host: bench"]
    lines += [f"{k}: {v}" for k, v in headers.as_dict().items()]
    if body:
        lines += ["content-type: application/json", f"content-length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def put_body(index: int, version: int) -> bytes:
    data = base64.b64encode(version.to_bytes(4, "big") + os.urandom(DATA - 4)).decode()
    endpoints = [base64.b64encode(os.urandom(ENDPOINT)).decode() for _ in range(4)]
    return json.dumps({"data": data, "endpoints": endpoints, "ttl": 1800}).encode()


def updates(clusters: list[ClusterKeys], count: int) -> list[bytes]:
    out = []
    for index in range(count):
        keys = clusters[index % len(clusters)]
        affiliate = f"a{(index // len(clusters)) % 500}"
        target = f"/v1/clusters/{keys.cluster_address}/affiliates/{affiliate}"
        out.append(request_bytes(keys, "PUT", target, put_body(index, index)))
    return out


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))  # type: ignore[union-attr]
    return status, await reader.readexactly(length)


async def drive(host: str, port: int, requests: list[bytes]) -> float:
    """Send all requests over CONNECTIONS keep-alive connections; requests per second."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for item in requests:
        queue.put_nowait(item)

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        while not queue.empty():
            writer.write(queue.get_nowait())
            status, body = await read_response(reader)
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
    return len(requests) / (time.perf_counter() - started)


def updates_per_second(clusters: int) -> float:
    keys = [ClusterKeys.derive(f"bench-{i}", os.urandom(32)) for i in range(clusters)]
    with service() as (host, port, _):
        warm = updates(keys, 500)
        uvloop.run(drive(host, port, warm))
        return uvloop.run(drive(host, port, updates(keys, UPDATES)))


def scrape(host: str, port: int, metric: str) -> float:
    with socket.create_connection((host, METRICS_PORT[port])) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    match = re.search(rf"^{metric} (\S+)$".encode(), data, re.M)
    return float(match.group(1)) if match else 0.0


def notify_latencies(rounds: int = 5) -> list[float]:
    keys = ClusterKeys.derive("bench-watch", os.urandom(32))
    base = f"/v1/clusters/{keys.cluster_address}/affiliates"
    latencies: list[float] = []
    with service() as (host, port, _):

        def one(request: bytes) -> bytes:
            with socket.create_connection((host, port)) as sock:
                sock.sendall(request)
                data = b""
                while b"\r\n\r\n" not in data or not data.endswith(b"}"):
                    data += sock.recv(65536)
            return data

        one(request_bytes(keys, "PUT", f"{base}/seed", put_body(0, 0)))
        for round_index in range(rounds):
            listing = one(request_bytes(keys, "GET", base, b""))
            revision = json.loads(listing.split(b"\r\n\r\n", 1)[1])["revision"]
            target = f"{base}?since={revision}&wait=30"
            epoll = select.epoll()
            sockets: dict[int, socket.socket] = {}
            for index in range(WATCHERS):
                # Each watcher from its own address, as each node would be.
                source = (f"127.3.{index // 250}.{index % 250 + 1}", 0)
                sock = socket.create_connection((host, port), source_address=source)
                sock.sendall(request_bytes(keys, "GET", target, b""))
                sock.setblocking(False)
                sockets[sock.fileno()] = sock
                epoll.register(sock.fileno(), select.EPOLLIN)
            deadline = time.monotonic() + 60
            while scrape(host, port, "kubespan_discovery_watchers") < WATCHERS:
                if time.monotonic() > deadline:
                    raise RuntimeError("the watchers never all reached the service")
                time.sleep(0.05)
            change = request_bytes(keys, "PUT", f"{base}/w{round_index}", put_body(1, round_index))
            with socket.create_connection((host, port)) as writer:
                changed_at = time.perf_counter()
                writer.sendall(change)
                pending = set(sockets)
                while pending:
                    for fd, _ in epoll.poll(5):
                        if fd in pending:
                            latencies.append((time.perf_counter() - changed_at) * 1000)
                            pending.discard(fd)
            for sock in sockets.values():
                sock.close()
            epoll.close()
    return latencies


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]


def bytes_per_member() -> float:
    clusters = [ClusterKeys.derive(f"bench-mem-{i}", os.urandom(32)) for i in range(10)]
    with service() as (host, port, pid):
        uvloop.run(drive(host, port, updates(clusters, 200)))  # warm up the allocator
        before = rss_bytes(pid)
        requests = []
        for index in range(MEMBERS):
            keys = clusters[index % 10]
            target = f"/v1/clusters/{keys.cluster_address}/affiliates/m{index}"
            requests.append(request_bytes(keys, "PUT", target, put_body(index, 0)))
        uvloop.run(drive(host, port, requests))
        grown = rss_bytes(pid) - before
    data = DATA + 4 * ENDPOINT
    return grown / MEMBERS - data


async def slowloris(host: str, port: int, count: int) -> None:
    """Keep `count` connections open, each having sent half a request head, each from its
    own loopback address; reopen those the service drops."""

    async def one(index: int) -> None:
        source = (f"127.1.{index // 250}.{index % 250 + 1}", 0)
        while True:
            try:
                reader, writer = await asyncio.open_connection(host, port, local_addr=source)
                writer.write(b"GET /v1/clusters/x/hello HTTP/1.1\r\nhost: bench\r\nx-slow: ")
                await reader.read()  # until the service gives up on us
                writer.close()
            except OSError:
                await asyncio.sleep(0.1)

    await asyncio.gather(*(one(i) for i in range(count)))


def run_slowloris(host: str, port: int, count: int) -> None:
    raise_open_files()
    uvloop.run(slowloris(host, port, count))


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def latencies_ms(host: str, port: int, requests: list[bytes], count: int) -> list[float]:
    """Each request on its own new connection, one after another."""
    samples = []
    for index in range(count):
        with socket.create_connection((host, port)) as sock:
            started = time.perf_counter()
            sock.sendall(requests[index % len(requests)])
            data = b""
            while b"\r\n\r\n" not in data or not data.endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            samples.append((time.perf_counter() - started) * 1000)
            if not data.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(data[:200])
    return samples


def under_slowloris() -> tuple[float, float, float]:
    """(updates ratio, healthz p99 ms, hello p99 ms) with 1,000 slow connections open."""
    keys = [ClusterKeys.derive("bench-slow", os.urandom(32))]
    with service() as (host, port, _):
        uvloop.run(drive(host, port, updates(keys, 500)))
        without = uvloop.run(drive(host, port, updates(keys, UPDATES)))
        attacker = multiprocessing.Process(target=run_slowloris, args=(host, port, 1000))
        attacker.start()
        try:
            deadline = time.monotonic() + 60
            while scrape(host, port, "kubespan_discovery_connections_waiting") < 990:
                if time.monotonic() > deadline:
                    raise RuntimeError("the slow connections never all reached the service")
                time.sleep(0.1)
            with_them = uvloop.run(drive(host, port, updates(keys, UPDATES)))
            health = b"GET /healthz HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n"
            health_ms = latencies_ms(host, METRICS_PORT[port], [health], 300)
            target = f"/v1/clusters/{keys[0].cluster_address}/hello"
            hellos = [request_bytes(keys[0], "GET", target, b"") for _ in range(300)]
            hello_ms = latencies_ms(host, port, hellos, 300)
            still_open = scrape(host, port, "kubespan_discovery_connections_waiting")
            if still_open < 900:
                raise RuntimeError(f"only {still_open:.0f} slow connections were open")
        finally:
            attacker.terminate()
            attacker.join()
    return with_them / without, p99(health_ms), p99(hello_ms)


def snapshot_stalls() -> tuple[float, float]:
    """(snapshot MiB, the slowest /healthz while snapshots of it are written)."""
    maximal = 6000
    flags = (
        *("--state-dir", "{tmp}/state", "--snapshot-interval", "0.5"),
        *("--max-affiliates", str(maximal), "--max-stored-mib", "1024"),
    )
    with service(*flags) as (host, port, _):
        requests = []
        for index in range(maximal):
            keys = ClusterKeys.derive(f"bench-snap-{index // 1000}", bytes(32))
            target = f"/v1/clusters/{keys.cluster_address}/affiliates/m{index}"
            document = {
                "data": base64.b64encode(os.urandom(4096)).decode(),
                "endpoints": [base64.b64encode(os.urandom(128)).decode() for _ in range(64)],
                "ttl": 3600,
            }
            requests.append(request_bytes(keys, "PUT", target, json.dumps(document).encode()))
        uvloop.run(drive(host, port, requests))
        health = b"GET /healthz HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n"
        samples: list[float] = []
        until = time.monotonic() + 8  # several snapshots, each written while we ask
        while time.monotonic() < until:
            samples += latencies_ms(host, METRICS_PORT[port], [health], 20)
        size = scrape(host, port, "kubespan_discovery_stored_bytes")
        if scrape(host, port, "kubespan_discovery_snapshot_seconds") <= 0:
            raise RuntimeError("no snapshot was written while measuring")
    return size / 2**20, max(samples)


def raise_open_files() -> None:
    """A thousand watchers need a thousand sockets here and in the service (inherited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))


def main() -> int:
    raise_open_files()
    one = updates_per_second(1)
    many = updates_per_second(1000)
    print(f"updates_per_s={one:.0f}", flush=True)
    print(f"updates_per_s_many={many:.0f}")
    print(f"updates_ratio_many_to_one={many / one:.2f}", flush=True)
    latencies = sorted(notify_latencies())
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(f"notify_p50_ms={statistics.median(latencies):.1f}")
    print(f"notify_p99_ms={p99:.1f}", flush=True)
    print(f"bytes_per_member={bytes_per_member():.0f}", flush=True)
    ratio, health_p99, hello_p99 = under_slowloris()
    print(f"updates_ratio_under_slowloris={ratio:.2f}")
    print(f"healthz_p99_ms_under_slowloris={health_p99:.1f}")
    print(f"hello_p99_ms_under_slowloris={hello_p99:.1f}", flush=True)
    stored_mib, stall = snapshot_stalls()
    print(f"stored_mib={stored_mib:.0f}")
    print(f"healthz_max_ms_during_snapshots={stall:.1f}")
    print(f"load_average={os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
