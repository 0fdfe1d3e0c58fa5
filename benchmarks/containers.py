"""The pipeline in containers against the same pipeline as local processes: wall time per task and
in all, as a ratio (docker / subprocess), both runs in one invocation on the same config.

    python benchmarks/containers.py [key=value overrides]      (default: 4 epochs, small models)

Needs the image (`make image-cpu`; DLU_IMAGE_TAG picks another) and a container engine
(Docker, or podman's socket in DOCKER_HOST). Task times are from each task's start to its outputs
written, as `make run` prints them; the totals include kfp.local's task start-up and, for
containers, starting each one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT = ["train.epochs=4", "train.early_stopping_patience=0", "model.hidden_sizes=[64]", "evaluate.mc_samples=8"]


def run(runner: str, overrides: list[str], workdir: Path) -> tuple[float, dict[str, float]]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / runner / 'mlflow.db'}"}
    (workdir / runner).mkdir()
    tic = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pipelines", "run-local", "--runner", runner, "--pipeline-root",
                          str(workdir / runner / "out"), *overrides], cwd=REPO, env=env, capture_output=True,
                         text=True)
    wall = time.perf_counter() - tic
    if out.returncode:
        sys.exit(f"{runner} run failed: {out.stderr.strip() or out.stdout[-2000:]}")
    line = re.search(r"^task wall times \(s\): (.*)$", out.stdout, re.M)[1]
    tasks = {}
    for group in line.split(" | "):
        name, _, rest = group.partition(" ")
        for entry in rest.split(", "):
            label, _, seconds = entry.rpartition(" ")
            tasks[f"{name} {label}".strip()] = float(seconds)
    return wall, tasks


def main() -> None:
    overrides = sys.argv[1:] or DEFAULT
    with tempfile.TemporaryDirectory() as tmp:
        local_wall, local = run("subprocess", overrides, Path(tmp))
        docker_wall, docker = run("docker", overrides, Path(tmp))
    print(f"config: {' '.join(overrides)}\n")
    print("| task | subprocess (s) | docker (s) | docker / subprocess |\n|---|---:|---:|---:|")
    for task in local:
        if task in docker:
            print(f"| {task} | {local[task]:.1f} | {docker[task]:.1f} | {docker[task] / local[task]:.2f} |")
    print(f"| **whole run** | {local_wall:.1f} | {docker_wall:.1f} | {docker_wall / local_wall:.2f} |")


if __name__ == "__main__":
    main()
