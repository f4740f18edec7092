"""Run a Python program with every thread under its own cProfile (`python3 -m cProfile` sees
the main thread only, and an agent's work is done in others), timed by the thread's CPU time,
so that waiting (select, locks) counts for nothing. Copied into the VM by
profile_idle.py and run there as

    python3 profile_runner.py OUT_DIR PROGRAM [ARG ...]

When the program ends (a clean stop ends the agent's threads first), each thread's stats are
written to OUT_DIR/NN-<thread name>.prof, and all of them merged to OUT_DIR/all.prof.

    python3 profile_runner.py --report OUT_DIR SORT LINES

prints each thread's total time in its own code and calls, and the merged top LINES."""

from __future__ import annotations

import cProfile
import pstats
import re
import runpy
import sys
import threading
import time
from pathlib import Path

_profiles: list[tuple[str, cProfile.Profile]] = []
_profiles_lock = threading.Lock()
_original_run = threading.Thread.run


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
        try:
            stats = pstats.Stats(profile)
        except TypeError:
            continue  # a thread that never made a call (no stats to read)
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:60]
        stats.dump_stats(out / f"{index:02d}-{safe}.prof")
        if merged is None:
            merged = stats
        else:
            merged.add(stats)
    if merged is not None:
        merged.dump_stats(out / "all.prof")


def _report(out: Path, sort: str, lines: int) -> None:
    print("# per thread: CPU seconds while profiled, calls")
    for path in sorted(out.glob("[0-9]*.prof")):
        stats = pstats.Stats(str(path))
        total = stats.total_tt  # type: ignore[attr-defined]
        calls = stats.total_calls  # type: ignore[attr-defined]
        print(f"{path.stem:40s} {total:9.3f} {calls:9d}")
    merged = out / "all.prof"
    if merged.exists():
        pstats.Stats(str(merged)).sort_stats(sort).print_stats(lines)


def main() -> None:
    if sys.argv[1] == "--report":
        _report(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
        return
    out, program = Path(sys.argv[1]), sys.argv[2]
    sys.argv = sys.argv[2:]
    threading.Thread.run = _profiled_run  # type: ignore[method-assign]
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
