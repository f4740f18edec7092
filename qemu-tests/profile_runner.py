"""Run a Python program with every thread under its own cProfile (`python3 -m cProfile` sees
the main thread only, and an agent's work is done in others), timed by the thread's CPU time,
so that waiting (select, locks) counts for nothing. Copied into the VM by
profile_idle.py and run there as

    python3 profile_runner.py OUT_DIR PROGRAM [ARG ...]

SIGUSR2 clears every profile (sent once the program has settled, so that start-up is not
counted). When the program ends, each thread's stats are written to OUT_DIR/NN-<thread
name>.prof, and all of them merged to OUT_DIR/all.prof; a thread still running then (one
blocked in a long poll) has the calls it is in left out.

    python3 profile_runner.py --report OUT_DIR SORT LINES

prints each thread's total time in its own code and calls, the cyclic garbage collector's
CPU time by generation (cProfile charges it to whatever call allocated), and the merged top
LINES."""

from __future__ import annotations

import cProfile
import gc
import pstats
import re
import runpy
import signal
import sys
import threading
import time
from pathlib import Path

_profiles: list[tuple[str, cProfile.Profile]] = []
_profiles_lock = threading.Lock()
_original_run = threading.Thread.run
# Per generation: collections, CPU seconds. The start of the collection running now, per
# thread (a collection runs in the thread whose allocation set it off).
_gc_totals: dict[int, list[float]] = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}
_gc_started = threading.local()


def _time_gc(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _gc_started.at = time.thread_time()
        return
    started = getattr(_gc_started, "at", None)
    if started is not None:
        totals = _gc_totals[info["generation"]]
        totals[0] += 1
        totals[1] += time.thread_time() - started


def _profiled_run(self: threading.Thread) -> None:
    profile = cProfile.Profile(time.thread_time)
    with _profiles_lock:
        _profiles.append((self.name, profile))
    profile.enable()
    try:
        _original_run(self)
    finally:
        profile.disable()


def _write(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    merged: pstats.Stats | None = None
    with _profiles_lock:
        profiles = list(_profiles)
    for index, (name, profile) in enumerate(profiles):
        # Read without disabling: disabling from this thread would close a running thread's
        # open calls with this thread's CPU clock.
        profile.snapshot_stats()
        if not profile.stats:
            continue
        stats = pstats.Stats()
        stats.stats = profile.stats  # type: ignore[attr-defined]
        stats.get_top_level_stats()
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:60]
        stats.dump_stats(out / f"{index:02d}-{safe}.prof")
        if merged is None:
            merged = stats
        else:
            merged.add(stats)
    if merged is not None:
        merged.dump_stats(out / "all.prof")
    (out / "gc.txt").write_text(
        "".join(
            f"gc generation {generation}: {count:.0f} collections, {seconds:.3f} s CPU\n"
            for generation, (count, seconds) in sorted(_gc_totals.items())
        )
    )


def _report(out: Path, sort: str, lines: int) -> None:
    print("# per thread: CPU seconds while profiled, calls")
    for path in sorted(out.glob("[0-9]*.prof")):
        stats = pstats.Stats(str(path))
        total = stats.total_tt  # type: ignore[attr-defined]
        calls = stats.total_calls  # type: ignore[attr-defined]
        print(f"{path.stem:40s} {total:9.3f} {calls:9d}")
    if (out / "gc.txt").exists():
        print((out / "gc.txt").read_text(), end="")
    merged = out / "all.prof"
    if merged.exists():
        pstats.Stats(str(merged)).sort_stats(sort).print_stats(lines)


def _clear(signum: int, frame: object) -> None:
    with _profiles_lock:
        profiles = [profile for _, profile in _profiles]
    for profile in profiles:
        profile.clear()
    for totals in _gc_totals.values():
        totals[:] = [0, 0.0]


def main() -> None:
    if sys.argv[1] == "--report":
        _report(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
        return
    out, program = Path(sys.argv[1]), sys.argv[2]
    sys.argv = sys.argv[2:]
    threading.Thread.run = _profiled_run  # type: ignore[method-assign]
    signal.signal(signal.SIGUSR2, _clear)
    gc.callbacks.append(_time_gc)
    main_profile = cProfile.Profile(time.thread_time)
    with _profiles_lock:
        _profiles.append(("MainThread", main_profile))
    main_profile.enable()
    try:
        runpy.run_path(program, run_name="__main__")
    finally:
        main_profile.disable()
        _write(out)


if __name__ == "__main__":
    main()
