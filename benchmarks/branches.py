"""`make run` with every model's branch at once against kfp.local's own limit of two at a time.

    python benchmarks/branches.py [--repeats 2] [key=value overrides]   (default: the default config)

Both variants run the same pipeline in this process, alternating, each on its own SQLite store
(created before timing). kfp.local (2.17) runs at most two ParallelFor iterations at once, so with
three models the third branch waits for a slot; ``pipelines.local`` lifts that limit. Wall time is
the pipeline's; CPU is user + sys of its task processes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

from pipelines import local  # noqa: E402


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(overrides: list[str], workdir: Path, all_at_once: bool) -> tuple[float, float]:
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    original = local._branches_at_once
    if not all_at_once:
        local._branches_at_once = lambda branches: contextlib.nullcontext()
    try:
        cpu, tic = children_cpu(), time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            local.run_local(overrides, workdir / "out")
        return time.perf_counter() - tic, children_cpu() - cpu
    finally:
        local._branches_at_once = original


def say(text: str) -> None:
    sys.stdout.write(text + "\n")  # kfp.local leaves builtins.print indented after a run
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {"kfp limit (2)": [], "all at once": []}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {name: Path(tmp) / str(i) for i, name in enumerate(results)}
        for folder in dirs.values():  # warm-up: creates each store, fills the OS file cache
            folder.mkdir()
            run([*args.overrides, "pipeline.models=[mc_dropout_dnn]", "train.epochs=1"], folder, True)
        for repeat in range(args.repeats):
            for name, folder in dirs.items():
                wall, cpu = run(args.overrides, folder, all_at_once=name == "all at once")
                results[name].append((wall, cpu))
                say(f"repeat {repeat + 1}: {name:14s} wall {wall:5.1f} s  CPU {cpu:5.1f} s")
    base, ours = (statistics.median(w for w, _ in results[k]) for k in results)
    say(f"\nmedian wall: kfp limit {base:.1f} s, all at once {ours:.1f} s; ratio {base / ours:.2f}x "
          f"on {os.cpu_count()} cores (load average at the end {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
