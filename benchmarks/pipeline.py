"""Pipeline overhead: `make run` (kfp.local) wall time and peak memory per step, against calling
the same core functions directly in one process.

    python benchmarks/pipeline.py [key=value overrides]     (default: the full default config)

Per-step times come from kfp.local's own log (task start to finish, so they include each task's
Python start-up and imports); per-step peak memory is the largest peak RSS (VmHWM) of that step's
task processes, polled from /proc.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

LINE = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) - \w+ - (Executing task|Task) .*?'(\w[\w-]*)'.*?(finished)?")


def _task_peaks(peaks: dict[str, float], done: threading.Event) -> None:
    """Poll /proc for kfp task processes; keep each step's largest VmHWM (peak RSS, MB)."""
    while not done.is_set():
        for status in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                argv = status.read_bytes().split(b"\0")
                if b"--function_to_execute" not in argv:
                    continue
                step = argv[argv.index(b"--function_to_execute") + 1].decode()
                text = (status.parent / "status").read_text()
            except (OSError, IndexError):
                continue  # the process ended between the two reads
            kb = int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) if "VmHWM" in text else 0
            peaks[step] = max(peaks.get(step, 0.0), kb / 1024)
        done.wait(0.05)


def kfp_local(overrides: list[str], workdir: Path) -> tuple[float, float, float, dict[str, float], dict[str, float]]:
    """Wall seconds, largest peak RSS (MB), CPU seconds (user + sys of every task), seconds and peak RSS per step."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'kfp.db'}"}
    tic = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipelines", "run-local", "--verbose", "--pipeline-root",
                             str(workdir / "out"), *overrides], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peaks: dict[str, float] = {}
    done = threading.Event()
    poller = threading.Thread(target=_task_peaks, args=(peaks, done), daemon=True)
    poller.start()
    log = proc.communicate()[0]
    wall = time.perf_counter() - tic
    done.set()
    poller.join()
    if proc.returncode:
        sys.exit(f"run-local failed:\n{log[-3000:]}")
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak, cpu = children.ru_maxrss / 1024, children.ru_utime + children.ru_stime
    plain = re.sub(r"\x1b\[[0-9;]*m", "", log)
    starts: dict[str, list[datetime]] = {}
    steps: dict[str, float] = {}
    for line in plain.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        stamp, task = datetime.strptime(m.group(1), "%H:%M:%S.%f"), m.group(3)
        if m.group(2) == "Executing task":
            starts.setdefault(task, []).append(stamp)
        elif "finished" in line and starts.get(task):
            steps[task] = steps.get(task, 0.0) + (stamp - starts[task].pop(0)).total_seconds()
    return wall, peak, cpu, steps, peaks


def direct(overrides: list[str], workdir: Path) -> tuple[float, dict[str, float]]:
    """The same steps as plain function calls in one process: same MLflow logging, no KFP artifacts."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'direct.db'}"
    os.chdir(workdir)
    steps: dict[str, float] = {}
    tic0 = time.perf_counter()

    def timed(name, fn):
        tic = time.perf_counter()
        out = fn()
        steps[name] = steps.get(name, 0.0) + time.perf_counter() - tic
        return out

    import mlflow

    from dl_uncertainty.config.compose import load_config, model_configs, pick_config
    from dl_uncertainty.data.tables import prepare
    from dl_uncertainty.reports.evaluation import evaluate_model
    from dl_uncertainty.tracking.compare import (
        pick_winner,
        register_champion,
        registered_name,
        selection_metric,
    )
    from dl_uncertainty.tracking.runs import log_evaluation
    from dl_uncertainty.train import train_and_log

    def evaluate_and_log(mcfg, trained):
        evaluation = evaluate_model(trained.model, mcfg, splits["test"], splits["ood"], splits["val"],
                                    calib=splits["calib"], calibration=trained.calibration)
        with mlflow.start_run(run_id=trained.run_id):
            log_evaluation(evaluation)
        return evaluation

    base = load_config(overrides)
    configs = timed("configure", lambda: model_configs(list(base.pipeline.models), overrides))
    cfg = pick_config(configs)
    splits = timed("preprocess", lambda: prepare(cfg.data, cfg.seed))
    results, runs = {}, {}
    for name in base.pipeline.models:
        mcfg = pick_config(configs, name)
        trained = timed("train", lambda mcfg=mcfg: train_and_log(mcfg, splits["train"], splits["val"], splits["calib"]))
        ev = timed("evaluate", lambda mcfg=mcfg, trained=trained: evaluate_and_log(mcfg, trained))
        results[name], runs[name] = ev.metrics, trained.run_id
    timed("compare", lambda: register_champion(
        runs[pick_winner(results, selection_metric(cfg.evaluate.winner_metric), cfg.evaluate.winner_mode)],
        registered_name(cfg.data, splits["train"].schema.feature_shape, cfg.evaluate.registered_model_name)))
    return time.perf_counter() - tic0, steps


def main() -> None:
    overrides = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        wall_kfp, peak_kfp, cpu_kfp, steps_kfp, peaks = kfp_local(overrides, work)
        wall_direct, steps_direct = direct(overrides, work)
        peak_direct = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"# overrides: {' '.join(overrides) or '(defaults)'}")
    print("| step | kfp.local s | direct s | ratio | kfp.local peak RSS MB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    # kfp.local runs each branch's train and evaluate as one task, train-evaluate (train_evaluate in its argv)
    steps_direct["train-evaluate"] = steps_direct.get("train", 0.0) + steps_direct.get("evaluate", 0.0)
    peaks["train-evaluate"] = peaks.get("train_evaluate", float("nan"))
    for step in ("configure", "preprocess", "train", "evaluate", "train-evaluate", "compare"):
        if step not in steps_kfp:
            continue
        k, d = steps_kfp[step], steps_direct.get(step, float("nan"))
        print(f"| {step} | {k:.1f} | {d:.1f} | {k / d:.1f}x | {peaks.get(step, float('nan')):.0f} |")
    print(f"| **total (wall)** | {wall_kfp:.1f} | {wall_direct:.1f} | {wall_kfp / wall_direct:.2f}x |")
    print(f"\nkfp.local CPU (user + sys, every task): {cpu_kfp:.1f} s; load average {os.getloadavg()[0]:.1f} at the end")
    print(f"peak RSS: kfp.local largest process {peak_kfp:.0f} MB; direct (one process) {peak_direct:.0f} MB")
    print("kfp.local runs ParallelFor branches concurrently, so its per-step sums can exceed its wall time.")


if __name__ == "__main__":
    main()
