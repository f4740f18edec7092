"""`make bench-idle`: what the agent costs on an idle node (issue 11), as `name=value` lines:

    idle_cpu_percent_2, idle_rss_mb_2        node1's agent with 2 peers (node2, node3: VMs)
    idle_cpu_percent_100, idle_rss_mb_100    the same with 100 peers (98 of them fake, dead)
    idle_cpu_percent_100_live, idle_rss_mb_100_live
                                             the same with the 98 fakes made live
    idle_rss_mb_python_baseline              an idle `python3 -c "import time; ..."` there
    idle_passes_per_s_N, idle_cpu_ms_per_pass_N   reconcile passes in the window (the agent's
                                             own counter, served on loopback metrics), and
                                             the agent's CPU over them
    idle_thread_cpu_percent_N_NAME, idle_threads_N, ...   each phase's threads and the rest

One lab, three nodes booted from the image, the discovery service on the lab's host side, and
a fourth VM ("fakes", the same image, kubespan disabled: no member) booted with them. Once
the mesh is up and node1's agent has reconciled for 30 s more, node1's agent is measured over
60 s; then 98 fake members are registered on the discovery service from the host, as real
members register (records signed with each one's own WireGuard key, sealed for the cluster;
addresses in TEST-NET-3, endpoints at ports of the fakes VM where nothing listens yet), and
once node1 lists 100 peers and has run 60 s more with them, it is measured over 60 s again.
Last, the fakes VM brings the 98 fakes up, one WireGuard interface each (the fake's key and
endpoint port, node1 its one peer, the cluster's preshared key, the fake's ULA on it and routed
back through it), so that each fake answers node1's probes as a live peer; once node1 reports
all 100 peers up and has run 60 s more, it is measured over 60 s a third time. The fakes do
not probe node1 as a real agent would: node1 sees answers to its own probes and keepalives.

Measured inside node1's guest, from /proc, each reading in one guest command: CPU percent is
the agent's utime+stime (/proc/MAINPID/stat, all threads, in `getconf CLK_TCK` ticks) over the
guest's /proc/uptime across the window; RSS is VmRSS (and VmHWM, Threads) from
/proc/MAINPID/status at the end of the window. MB here are MiB. Targets: at most 0.5 % CPU
and 60 MB RSS. Nothing else is asked of node1 during a window; the waits before read the
status file the agent writes at every pass (a `cat`, not a `kubespan status` process).
Each node's agent journal is kept in WORKDIR/journals/. Needs root and `make image`; exit
status 1 if the run failed.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from kslab import GuestAgentError, Lab, LabError, NicSpec, Vm, VmSpec, find_image, wait_until
from mesh import Cluster, start_cluster, wait_for_mesh

REPO = Path(__file__).resolve().parent.parent
KUBESPAN = REPO / ".venv" / "bin" / "kubespan"

NODES = 3  # node1 is measured; node2 and node3 are its real peers
FAKE_PEERS = 98  # with node2 and node3: 100 peers
FAKE_NET = ipaddress.IPv4Network("203.0.113.0/24")  # TEST-NET-3: the lab routes it nowhere
WIREGUARD_PORT = 51820  # node1's (the config's default listenPort)
# The VM that plays the fake members once they are made live: kubespan disabled, on the LAN
# at this host number (node1..3 are 11..13). Fake number i (from 1) has its endpoint at
# FAKE_PORT_BASE + i there; in the dead phases nothing listens on those ports.
FAKES_VM = "fakes"
FAKES_HOST = 20
FAKE_PORT_BASE = 51820
FAKES_DIR = "/run/ksfakes"  # in the fakes VM: keys (mode 0600)
FAKES_TABLE_BASE = 1000  # fake i's replies are routed by table FAKES_TABLE_BASE + i
PERSISTENT_KEEPALIVE = 25  # the fakes' towards node1, as a member's (kubespan.model)
SETTLE_2_S = 30.0  # agent passes after the mesh is up, before the 2-peer window
SETTLE_100_S = 60.0  # agent passes after node1 lists 100 peers, before the 100-peer window
WINDOW_S = 60.0  # each measurement window
TARGET_CPU_PERCENT = 0.5
TARGET_RSS_MB = 60.0
AGENT_UNIT = "kubespan"
BASELINE_UNIT = "idle-python-baseline"
BASELINE_ARGV = ["python3", "-c", "import time; time.sleep(1e6)"]
METRICS_LISTEN = "127.0.0.1:9477"  # loopback in each guest: read by a guest command
PASSES_METRIC = "kubespan_reconcile_passes_total"
READ_PASSES = (
    "import urllib.request; "
    f"text = urllib.request.urlopen('http://{METRICS_LISTEN}/metrics', timeout=20).read(); "
    f"print(next(l for l in text.decode().splitlines() if l.startswith('{PASSES_METRIC} ')))"
)
REGISTER_COMMAND = "register-fakes"  # internal: run inside the lab namespace (see below)
# Written by the agent at every pass (agent/status.py, runtime dir of kubespan.service).
STATUS_FILE = "/run/kubespan/status.json"
# A fixed pure-Python workload, timed in the guest and on the host (the TCG slowdown).
CALIBRATION = (
    "import time; t = time.process_time(); sum(i * i for i in range(3_000_000)); "
    "print(time.process_time() - t)"
)


# --- reading a process's cost from /proc in the guest ------------------------------------


@dataclass(frozen=True)
class ProcStat:
    """One process at one instant, as the guest's /proc shows it."""

    pid: int
    start_ticks: int  # starttime: tells a restarted process (same pid) apart
    cpu_ticks: int  # utime + stime, every thread of the process
    child_ticks: int  # cutime + cstime: children it has waited for
    rss_kb: int
    hwm_kb: int
    threads: int
    children: int  # live child processes
    # utime + stime of each thread, by the name it gave the kernel (threads of one name
    # added up)
    thread_ticks: dict[str, int]


@dataclass(frozen=True)
class Sample:
    """Several processes read at once: /proc/uptime and their stat lines by one `cat`."""

    uptime: float  # guest seconds since boot
    clk_tck: int
    procs: dict[int, ProcStat]


@dataclass(frozen=True)
class Usage:
    """A process over a window: CPU as a percent of one CPU, memory at the window's end."""

    seconds: float
    cpu_percent: float
    child_cpu_percent: float
    rss_mb: float
    hwm_mb: float
    threads: int
    children: int
    thread_cpu_percent: dict[str, float]  # by thread name; those that ran in the window


def sample_script(pids: list[int]) -> str:
    """The guest shell snippet of one Sample: uptime and stat lines first, in one read."""
    stats = " ".join(f"/proc/{pid}/stat" for pid in pids)
    lines = ["set -e", f"cat /proc/uptime {stats}", "getconf CLK_TCK"]
    for pid in pids:
        lines.append(f"sed -n 's/^\\(VmRSS\\|VmHWM\\|Threads\\):/{pid} \\1/p' /proc/{pid}/status")
        lines.append(f"echo {pid} Children $(ps --no-headers --ppid {pid} -o pid | wc -l)")
        # A thread may end between the glob and the read: its line is left out.
        lines.append(
            f'for t in /proc/{pid}/task/*; do s=$(cat "$t/stat" 2>/dev/null) && '
            f'echo "T {pid} $s" || true; done'
        )
    return "\n".join(lines) + "\n"


def parse_stat(line: str) -> tuple[int, int, int, int]:
    """(pid, starttime, utime+stime, cutime+cstime) of a /proc/PID/stat line; the command
    name (field 2, in parentheses) may hold spaces, so fields count from its closing one."""
    pid = int(line.split(" ", 1)[0])
    rest = line[line.rindex(")") + 2 :].split()  # rest[0] is field 3 (state)
    utime, stime, cutime, cstime = (int(rest[i - 3]) for i in (14, 15, 16, 17))
    return pid, int(rest[22 - 3]), utime + stime, cutime + cstime


def parse_sample(text: str, pids: list[int]) -> Sample:
    lines = text.splitlines()
    uptime = float(lines[0].split()[0])
    stats = [parse_stat(line) for line in lines[1 : 1 + len(pids)]]
    clk_tck = int(lines[1 + len(pids)])
    fields: dict[tuple[int, str], int] = {}
    threads: dict[int, dict[str, int]] = {pid: {} for pid in pids}
    for line in lines[2 + len(pids) :]:
        if line.startswith("T "):
            _, owner, stat = line.split(" ", 2)
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            ticks = parse_stat(stat)[2]
            threads[int(owner)][name] = threads[int(owner)].get(name, 0) + ticks
            continue
        pid, name, value = line.split(None, 2)
        fields[int(pid), name] = int(value.split()[0])  # "123 kB" or a count
    procs = {
        pid: ProcStat(
            pid,
            start,
            cpu,
            child,
            fields[pid, "VmRSS"],
            fields[pid, "VmHWM"],
            fields[pid, "Threads"],
            fields[pid, "Children"],
            threads[pid],
        )
        for pid, start, cpu, child in stats
    }
    if sorted(procs) != sorted(pids):
        raise LabError(f"read /proc of {sorted(procs)}, wanted {sorted(pids)}:\n{text}")
    return Sample(uptime, clk_tck, procs)


def sample(vm: Vm, pids: list[int]) -> Sample:
    result = vm.sh(sample_script(pids), timeout=60)
    if result.exit_code != 0:
        raise LabError(
            f"{vm.name}: reading /proc of {pids}: exit {result.exit_code}: "
            f"{result.stderr.strip()}\n{result.stdout}"
        )
    return parse_sample(result.stdout, pids)


def usage(first: Sample, last: Sample, pid: int) -> Usage:
    a, b = first.procs[pid], last.procs[pid]
    if a.start_ticks != b.start_ticks:
        raise LabError(f"process {pid} was restarted during the window")
    seconds = last.uptime - first.uptime
    per_second = last.clk_tck * seconds / 100.0  # ticks in 1 % of one CPU over the window
    return Usage(
        seconds,
        (b.cpu_ticks - a.cpu_ticks) / per_second,
        (b.child_ticks - a.child_ticks) / per_second,
        b.rss_kb / 1024,
        b.hwm_kb / 1024,
        b.threads,
        b.children,
        {
            name: (ticks - a.thread_ticks.get(name, 0)) / per_second
            for name, ticks in sorted(b.thread_ticks.items())
            if ticks > a.thread_ticks.get(name, 0)
        },
    )


def measure(vm: Vm, pids: list[int], seconds: float) -> dict[int, Usage]:
    """Each process's usage over a window of `seconds` (guest time; nothing else is asked
    of the guest meanwhile)."""
    first = sample(vm, pids)
    time.sleep(seconds)  # the measurement window itself
    last = sample(vm, pids)
    return {pid: usage(first, last, pid) for pid in pids}


def main_pid(vm: Vm, unit: str) -> int:
    """The unit's main process, once it has one."""

    def pid() -> int | None:
        text = vm.exec(["systemctl", "show", "-P", "MainPID", unit]).stdout.strip()
        return int(text) if text.isdigit() and int(text) > 0 else None

    return wait_until(pid, 60.0, f"{vm.name}: a main process of {unit}", interval=1.0)


# --- fake members --------------------------------------------------------------------------


@dataclass(frozen=True)
class Fake:
    """A fake member as the fakes VM plays it: its WireGuard private key (base64), its ULA
    and the UDP port its record names as its endpoint there."""

    private_key: str
    ula: str
    port: int


@dataclass(frozen=True)
class Fakes:
    """What `register_fakes` made: the members, and the cluster's WireGuard preshared key
    (base64) that every member sets on its peers."""

    preshared_key: str
    members: tuple[Fake, ...]


def register_fakes(
    url: str, cluster_id: str, secret: str, count: int, endpoint_host: str | None = None
) -> None:
    """Register `count` members that do not exist, as a real member registers: each its own
    WireGuard key (so its node id and signature are right), a ULA in the cluster prefix made
    from a MAC as a node makes it, one address in TEST-NET-3, a record sealed for the agents'
    30 min and stored for as long. The endpoint of fake number i (from 1) is
    `endpoint_host`:FAKE_PORT_BASE+i, or without a host its address in TEST-NET-3 at the
    WireGuard port. Prints the fakes (Fakes, as JSON): what the fakes VM needs to play them.
    Runs inside the lab namespace (discovery listens there)."""
    from kubespan.agent.session import TTL_SECONDS
    from kubespan.config.interpret import decode_key32
    from kubespan.crypto import ClusterKeys
    from kubespan.discovery.client import DiscoveryClient
    from kubespan.discovery.members import seal_registration
    from kubespan.identity import generate_identity, node_ula
    from kubespan.model import AffiliateInfo
    from kubespan.netaddr import Endpoint

    keys = ClusterKeys.derive(cluster_id, decode_key32(secret))
    client = DiscoveryClient(url, keys)
    fakes: list[dict[str, Any]] = []
    for index in range(1, count + 1):
        identity = generate_identity(os.urandom)
        address = FAKE_NET[index]
        mac = bytes((0x52, 0x54, 0x00, 0xFE, index >> 8, index & 0xFF))
        ula = node_ula(cluster_id, mac)
        info = AffiliateInfo(
            node_id=identity.node_id,
            hostname=f"fake{index:03d}",
            public_key=identity.public_key_b64,
            ula=ula,
            addresses=(address,),
        )
        if endpoint_host is None:
            endpoint = Endpoint(address, WIREGUARD_PORT)
        else:
            endpoint = Endpoint(ipaddress.ip_address(endpoint_host), FAKE_PORT_BASE + index)
        now = time.time()
        registration = seal_registration(
            keys,
            info,
            (endpoint,),
            identity.private_key,
            version=int(now * 1000),
            valid_until=int(now) + TTL_SECONDS,
        )
        # The client waits out the service's rate limit (HTTP 429) by itself.
        client.put(
            registration.affiliate_id,
            registration.data,
            list(registration.endpoints),
            TTL_SECONDS,
        )
        fakes.append(
            {"private_key": identity.private_key_b64, "ula": str(ula), "port": endpoint.port}
        )
    client.close()
    print(json.dumps({"preshared_key": keys.wireguard_psk_b64, "members": fakes}))


def add_fakes(cluster: Cluster, count: int, endpoint_host: str | None = None) -> Fakes:
    """Register `count` fake members (register_fakes); with `endpoint_host`, their
    endpoints are ports on that address."""
    before = cluster.listed()
    result = cluster.lab.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            REGISTER_COMMAND,
            cluster.discovery_url,
            cluster.cluster_id,
            cluster.secret,
            str(count),
            *([] if endpoint_host is None else [endpoint_host]),
        ],
        timeout=300,
    )
    listed = cluster.listed()
    if listed != before + count:
        raise LabError(f"discovery lists {listed} members after adding {count} to {before}")
    document = json.loads(result.stdout.splitlines()[-1])  # printed last
    return Fakes(
        str(document["preshared_key"]),
        tuple(
            Fake(str(m["private_key"]), str(m["ula"]), int(m["port"])) for m in document["members"]
        ),
    )


# --- the fakes VM: the fake members made live ------------------------------------------------


def start_fakes_vm(cluster: Cluster) -> Vm:
    """Start (not wait for) the VM that plays the fake members once they are made live: the
    same image on the same LAN, kubespan disabled (it is no member itself)."""
    lan = cluster.lan
    spec = VmSpec(
        FAKES_VM,
        nics=(NicSpec(lan.name, (lan.address(FAKES_HOST), lan.address6(FAKES_HOST))),),
        machineconfig=cluster.config(enabled=False),
    )
    vm = cluster.lab.add_vm(spec)
    vm.start()
    return vm


def fakes_script(fakes: Fakes, node_key: str, node_ula: str, node_endpoint: str) -> str:
    """The guest shell script that brings every fake member up in the fakes VM: a WireGuard
    interface of its own (its key, its port, node1 its one peer, with the cluster's preshared
    key), its ULA on it, and a routing table of its own that the replies from its ULA take,
    so that each answers node1's probes through its own tunnel. The keepalive makes each send
    a handshake as soon as its interface is up."""
    lines = [
        "set -e",
        "umask 077",
        f"mkdir -p {FAKES_DIR}",
        f"echo '{fakes.preshared_key}' > {FAKES_DIR}/psk",  # base64: nothing to escape
        "up() {  # index port ula private-key",
        f'  echo "$4" > {FAKES_DIR}/$1.key',
        "  ip link add ksfake$1 type wireguard",
        f"  wg set ksfake$1 private-key {FAKES_DIR}/$1.key listen-port $2 peer {node_key} "
        f"preshared-key {FAKES_DIR}/psk allowed-ips {node_ula}/128 endpoint {node_endpoint} "
        f"persistent-keepalive {PERSISTENT_KEEPALIVE}",
        "  ip -6 addr add $3/128 dev ksfake$1",
        "  ip link set ksfake$1 up",  # IPv6 routes need the device up
        f"  ip -6 rule add from $3 lookup $(({FAKES_TABLE_BASE} + $1))",
        f"  ip -6 route add {node_ula}/128 dev ksfake$1 table $(({FAKES_TABLE_BASE} + $1))",
        "}",
    ]
    for index, fake in enumerate(fakes.members, start=1):
        lines.append(f"up {index} {fake.port} {fake.ula} '{fake.private_key}'")
    return "\n".join(lines) + "\n"


def make_fakes_live(cluster: Cluster, vm: Vm, node: Vm, fakes: Fakes) -> None:
    """Bring every fake up in the fakes VM (one guest command), as node1's peers."""
    document = agent_report(node)
    if document is None:
        raise LabError(f"{node.name}: no status to read its key and ULA from")
    endpoint = f"{cluster.node_address(node)}:{WIREGUARD_PORT}"
    script = fakes_script(fakes, document["node"]["public_key"], document["node"]["ula"], endpoint)
    vm.check(["/bin/sh", "-s"], stdin=script.encode(), timeout=600)
    interfaces = vm.check(["wg", "show", "interfaces"]).split()
    if len(interfaces) != len(fakes.members):
        raise LabError(
            f"{vm.name}: {len(interfaces)} WireGuard interfaces, wanted {len(fakes.members)}"
        )


def all_up(peers: int) -> Callable[[dict[str, Any]], bool]:
    def done(document: dict[str, Any]) -> bool:
        states = [peer["state"] for peer in document["peers"]]
        return len(states) == peers and all(state == "up" for state in states)

    return done


def agent_report(vm: Vm) -> dict[str, Any] | None:
    """The agent's last status (what `kubespan status --json` prints), read from the file it
    writes at every pass: a `cat`, where `kubespan status` would start a Python process in
    the guest and ask the agent itself, competing with what is measured. None while there is
    none, or while the guest is too busy to answer within a minute."""
    try:
        result = vm.exec(["cat", STATUS_FILE], timeout=60)
    except GuestAgentError:
        return None
    if result.exit_code != 0:
        return None
    try:
        document = json.loads(result.stdout.splitlines()[-1])  # printed last
    except ValueError:
        return None
    return document if isinstance(document, dict) and "peers" in document else None


def wait_reported(
    vm: Vm, what: str, timeout: float, done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Wait until the agent's status satisfies `done`; that status. Polls every 5 s."""

    def probe() -> dict[str, Any] | None:
        document = agent_report(vm)
        return document if document is not None and done(document) else None

    return wait_until(probe, timeout, f"{vm.name}: {what}", interval=5.0)


def wait_for_peers(vm: Vm, peers: int, timeout: float) -> float:
    """Wait until the agent reports `peers` peers; the `updated_at` (guest clock) of that."""
    document = wait_reported(
        vm, f"the agent to list {peers} peers", timeout, lambda d: len(d["peers"]) == peers
    )
    return float(document["updated_at"])


def wait_for_passes(vm: Vm, after: float, seconds: float) -> None:
    """Wait until the agent has published its status more than `seconds` after `after` (its
    own clock): it has run its passes for that long."""
    wait_reported(
        vm,
        f"the agent to keep reconciling for {seconds:g} s",
        seconds + 120,
        lambda d: float(d["updated_at"]) > after + seconds,
    )


def restarts(vm: Vm) -> str:
    return vm.check(["systemctl", "show", "-P", "NRestarts", AGENT_UNIT]).strip()


def python_seconds(argv: list[str], run: Callable[[list[str]], str]) -> float:
    """CPU seconds (process_time) a fixed pure-Python loop takes under `argv` (python)."""
    return float(run([*argv, "-c", CALIBRATION]).strip())


def peer_states(vm: Vm) -> str:
    document = agent_report(vm)
    if document is None:
        return "no status"
    states: dict[str, int] = {}
    for peer in document["peers"]:
        states[peer["state"]] = states.get(peer["state"], 0) + 1
    return ", ".join(f"{state} {n}" for state, n in sorted(states.items()))


# --- the run ---------------------------------------------------------------------------------


def passes(vm: Vm) -> int:
    """Reconcile passes the agent has finished, by its own counter."""
    return int(vm.check(["python3", "-c", READ_PASSES]).split()[-1])


def measure_passes(vm: Vm, pids: list[int]) -> tuple[dict[int, Usage], int]:
    """`measure` over WINDOW_S, and the passes the agent finished meanwhile (the counter is
    read just before and after, by commands of their own)."""
    before = passes(vm)
    used = measure(vm, pids, WINDOW_S)
    return used, passes(vm) - before


def report_passes(suffix: str, agent: Usage, count: int) -> None:
    print(f"idle_passes_per_s_{suffix}={count / agent.seconds:.2f}")
    cpu_ms = agent.cpu_percent / 100 * agent.seconds * 1000
    print(f"idle_cpu_ms_per_pass_{suffix}={cpu_ms / max(count, 1):.1f}")


def report(suffix: str, agent: Usage) -> None:
    print(f"idle_cpu_percent_{suffix}={agent.cpu_percent:.2f}")
    # Where it goes: each thread by the name it gave the kernel (the main thread's is the
    # program's); threads that did not run in the window are left out.
    for name, percent in agent.thread_cpu_percent.items():
        key = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "unnamed"
        print(f"idle_thread_cpu_percent_{suffix}_{key}={percent:.2f}")
    print(f"idle_rss_mb_{suffix}={agent.rss_mb:.1f}")
    print(f"idle_hwm_mb_{suffix}={agent.hwm_mb:.1f}")
    print(f"idle_child_cpu_percent_{suffix}={agent.child_cpu_percent:.2f}")
    print(f"idle_threads_{suffix}={agent.threads}")
    print(f"idle_children_{suffix}={agent.children}")
    cpu = "met" if agent.cpu_percent <= TARGET_CPU_PERCENT else "MISSED"
    rss = "met" if agent.rss_mb <= TARGET_RSS_MB else "MISSED"
    print(
        f"# {suffix} peers: CPU target <= {TARGET_CPU_PERCENT} % {cpu}, "
        f"RSS target <= {TARGET_RSS_MB:g} MB {rss} (window {agent.seconds:.1f} s guest time)",
        flush=True,
    )


def measure_live(cluster: Cluster, fakes_vm: Vm, node1: Vm, fakes: Fakes, agent: int) -> None:
    """The last phase: the fakes made live in the fakes VM, node1 measured once it reports
    all its peers up and has run SETTLE_100_S more with them."""
    make_fakes_live(cluster, fakes_vm, node1, fakes)
    up_at = float(
        wait_reported(
            node1,
            f"the agent to report {NODES - 1 + FAKE_PEERS} peers up",
            300,
            all_up(NODES - 1 + FAKE_PEERS),
        )["updated_at"]
    )
    print(
        f"# 100 live peers: the same {FAKE_PEERS} fakes made live in VM {FAKES_VM}, one "
        "WireGuard interface each (its key and endpoint port, node1 its only peer, the "
        "cluster's preshared key) with its ULA on it, routed back through its own interface: "
        "each answers node1's echo probes at its ULA through its tunnel, and sends a "
        f"keepalive every {PERSISTENT_KEEPALIVE} s as a member does",
        flush=True,
    )
    print(
        "# the fakes do not probe node1 themselves as a real agent would, nor run path "
        "checks: node1 sees only answers to its own probes (and keepalives); node2 and "
        "node3 are real",
        flush=True,
    )
    measure_phase(node1, agent, "100_live", up_at, "node1 reported 100 peers up", "whole run")


def measure_phase(node1: Vm, agent: int, suffix: str, since: float, what: str, so_far: str) -> int:
    """After SETTLE_100_S of passes since `since` (node1's clock, when `what`), node1's agent
    measured over a window and reported with `suffix`; its main pid (changed or not)."""
    wait_for_passes(node1, since, SETTLE_100_S)
    print(f"# measured after {SETTLE_100_S:g} s of passes since {what}", flush=True)
    if main_pid(node1, AGENT_UNIT) != agent:
        print("# note: the agent's main process changed between the two phases", flush=True)
        agent = main_pid(node1, AGENT_UNIT)
    used, count = measure_passes(node1, [agent])
    report(suffix, used[agent])
    report_passes(suffix, used[agent], count)
    print(f"# node1's peers after the window: {peer_states(node1)}", flush=True)
    print(f"# {AGENT_UNIT}.service restarts in node1 ({so_far}): {restarts(node1)}", flush=True)
    return agent


def run(lab: Lab, workdir: Path) -> None:
    state = workdir / "discovery-state"
    state.mkdir(parents=True)
    cluster = start_cluster(lab, KUBESPAN, state)
    fakes_vm = start_fakes_vm(cluster)  # boots with the nodes; idle until the last phase
    vms = cluster.boot(NODES, metricsListen=METRICS_LISTEN)
    fakes_vm.wait_agent()
    node1 = vms[0]
    statuses = wait_for_mesh(vms, timeout=480)
    print(
        "# TCG: the guests run under QEMU software emulation (no KVM), so every instruction "
        "costs several host instructions: CPU percent here is inflated relative to real "
        "hardware; RSS is not",
        flush=True,
    )
    print(
        f"# node1's agent ({AGENT_UNIT}.service MainPID), read in node1 from /proc; "
        f"CPU = (utime+stime)/CLK_TCK over /proc/uptime, {WINDOW_S:g} s windows; MB = MiB",
        flush=True,
    )

    # 2 peers: node2 and node3, the mesh up.
    wait_for_passes(node1, float(statuses[node1.name]["updated_at"]), SETTLE_2_S)
    node1.check(["systemd-run", f"--unit={BASELINE_UNIT}", *BASELINE_ARGV])
    agent = main_pid(node1, AGENT_UNIT)
    baseline = main_pid(node1, BASELINE_UNIT)
    print(
        f"# 2 peers: node2 and node3 (VMs), all up; measured after {SETTLE_2_S:g} s of "
        "passes since the mesh came up",
        flush=True,
    )
    used, count = measure_passes(node1, [agent, baseline])
    report("2", used[agent])
    report_passes("2", used[agent], count)
    print(f"# {AGENT_UNIT}.service restarts in node1 so far: {restarts(node1)}", flush=True)
    print(f"idle_rss_mb_python_baseline={used[baseline].rss_mb:.1f}")
    print(f"idle_cpu_percent_python_baseline={used[baseline].cpu_percent:.2f}")
    print(
        f'# baseline: `{" ".join(BASELINE_ARGV[:2])} "{BASELINE_ARGV[2]}"` in node1 '
        "(transient unit), read in the same commands as the agent",
        flush=True,
    )

    # 100 peers: node2, node3 and 98 fakes, dead.
    fakes_address = str(cluster.lan.address(FAKES_HOST).ip)
    fakes = add_fakes(cluster, FAKE_PEERS, fakes_address)
    listed_at = wait_for_peers(node1, NODES - 1 + FAKE_PEERS, timeout=300)
    print(
        f"# 100 peers: node2, node3 and {FAKE_PEERS} fake members registered on discovery "
        "from the host (own WireGuard keys, signed and sealed records, addresses in "
        f"{FAKE_NET}, endpoints at ports {FAKE_PORT_BASE + 1}-{FAKE_PORT_BASE + FAKE_PEERS} "
        f"of VM {FAKES_VM} on the LAN, {fakes_address})",
        flush=True,
    )
    print(
        f"# fake peers never answer yet: nothing listens on those ports ({FAKES_VM} answers "
        "ICMP port unreachable, which WireGuard ignores), so they stay down and node1 keeps "
        "trying them",
        flush=True,
    )
    agent = measure_phase(
        node1,
        agent,
        "100",
        listed_at,
        "node1 listed 100 peers (the fake peers' handshake trials back off meanwhile)",
        "so far",
    )

    # 100 peers, all live: the fakes VM plays the 98 fakes.
    measure_live(cluster, fakes_vm, node1, fakes, agent)

    guest = python_seconds(["python3"], node1.check)
    host = python_seconds(
        [sys.executable],
        lambda argv: subprocess.run(argv, capture_output=True, text=True, check=True).stdout,
    )
    print(f"tcg_python_slowdown={guest / host:.0f}")
    print(
        f"# TCG: the same pure-Python loop took {guest:.2f} s CPU in node1 and {host:.2f} s on "
        "the host: dividing the CPU percents by tcg_python_slowdown gives a rough figure for "
        "this host's hardware (rough: kernel work and I/O slow down differently)",
        flush=True,
    )


def keep_journals(lab: Lab, directory: Path) -> None:
    """Each node's agent journal, for reading where the time went (best effort)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, vm in lab.vms.items():
        try:
            (directory / f"{name}.log").write_text(vm.journal(f"{AGENT_UNIT}.service"))
        except LabError as e:
            print(f"bench-idle: journal of {name}: {e}", file=sys.stderr)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    if sys.argv[1:2] == [REGISTER_COMMAND]:
        url, cluster_id, secret, count = sys.argv[2:6]
        endpoint_host = sys.argv[6] if len(sys.argv) > 6 else None
        register_fakes(url, cluster_id, secret, int(count), endpoint_host)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep logs here (default: a temp dir); what a previous run left there is replaced",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench-idle needs root (network namespaces, taps)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # unwind, so the lab is torn down
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp:
        workdir = args.workdir or Path(tmp)
        # A previous run's state disks would make this one a restart, not a first boot.
        for stale in ("lab", "discovery-state", "journals"):
            shutil.rmtree(workdir / stale, ignore_errors=True)
        with Lab(workdir / "lab", find_image(REPO)) as lab:
            try:
                run(lab, workdir)
            except (AssertionError, LabError) as e:
                print("idle=fail", flush=True)
                print(f"bench-idle: {e}\n{lab.diagnostics()}", file=sys.stderr)
                return 1
            finally:
                keep_journals(lab, workdir / "journals")
    return 0


if __name__ == "__main__":
    sys.exit(main())
