"""Run the whole pipeline on this machine with kfp.local, then show what came out."""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from components.images import CPU_IMAGE
from dl_uncertainty.config.compose import branch_label, branches, load_config
from dl_uncertainty.errors import UserError, check_writable
from dl_uncertainty.tracking.store import (
    DEFAULT_URI,
    check_local_store,
    check_reachable,
    new_local_store,
    serve_local_store,
    setup,
    tracking_uri,
)
from pipelines.pipeline import PIPELINE_NAME, build_pipeline


def run_local(overrides: list[str], pipeline_root: str | Path = "local_outputs", verbose: bool = False,
              runner: str = "subprocess") -> Path:
    """Run ``uncertainty-pipeline`` with kfp.local; return the run's output folder.

    ``runner="subprocess"`` runs each task as a process in this environment; ``"docker"`` runs it
    in the project image (``make image-cpu``) through Docker or podman's Docker-compatible socket.
    """
    cfg = load_config(overrides)  # fail on a bad override before any task starts
    # and on the user's data if it cannot be read (a missing file, S3 credentials, a bad CSV), holds
    # unhandled infinite values or lacks an ood_classes label; scikit-learn's digits need no check
    # (nor the second its import takes)
    if cfg.data.source != "digits":
        from dl_uncertainty.data.tables import check_raw

        check_raw(cfg.data)
    run_dir, uri, seconds, log = execute(
        cfg, PIPELINE_NAME, pipeline_root, verbose, runner,
        lambda task_uri, image: build_pipeline(cfg, cluster=False, mlflow_tracking_uri=task_uri,
                                               default_overrides=overrides, image=image,
                                               one_task_per_branch=runner == "subprocess"),
        labels=[branch_label(b["model"], b["seed"], cfg.pipeline.seeds, b["fold"])
                for b in branches(list(cfg.pipeline.models), cfg.pipeline.seeds, cfg.seed, cfg.pipeline.folds)],
        at_once=len(cfg.pipeline.models))  # one branch per family at a time; further seeds queue
    _summary(run_dir, uri, seconds, log.task_times())
    return run_dir


def execute(cfg, name: str, pipeline_root: str | Path, verbose: bool, runner: str,
            build: Callable[[str, str | None], Callable], labels: list[str] | None = None,
            at_once: int | None = None) -> tuple[Path, str, float, _Tee]:
    """Run the pipeline ``build(tracking_uri, image)`` returns under kfp.local, after checking
    MLflow (and, for ``runner="docker"``, the engine and the image) before any work. ``labels``
    name the ParallelFor iterations in the progress lines; ``at_once`` of them run at a time (all by default).
    Returns the run's folder, the tracking URI, the seconds it took and its log."""
    from kfp import local

    # Our tasks name the project image; under the subprocess runner they run in this venv instead.
    warnings.filterwarnings("ignore", message="You may be attemping to run a task that uses custom")
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner")  # display names
    uri = tracking_uri(cfg)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    check_reachable(uri)
    check_local_store(uri)  # before any task: MLflow would fail only once a model is trained
    root = check_writable(Path(pipeline_root).resolve(), "--pipeline-root")
    image = None
    if runner == "docker":  # the engine and the image before any work
        from pipelines import containers

        client = containers.connect()
        image = containers.local_image(client, CPU_IMAGE)
    if new_local_store(uri):  # create its tables once here: parallel tasks would race to
        setup(cfg)
    before = set(root.glob(f"{name}-*"))
    with contextlib.ExitStack() as stack:
        task_uri, task_runner = uri, local.SubprocessRunner(use_venv=False)
        if runner == "docker":
            mounts = []
            if uri.startswith("sqlite:"):  # containers cannot open our sqlite file: serve it
                task_uri, artifacts = stack.enter_context(serve_local_store(uri))
                mounts.append(str(artifacts))
            task_runner = containers.runner(mounts)
            containers.use_task_containers()
            run_id = stack.enter_context(containers.task_containers(client))  # Ctrl-C: stopped before MLflow
            print(f"running every task in {image} ({os.environ['DOCKER_HOST']}), MLflow at {task_uri}; "
                  f"containers labelled {containers.RUN_LABEL}={run_id}")
        local.init(runner=task_runner, pipeline_root=str(root), raise_on_error=True)
        stack.enter_context(_branches_at_once(at_once or len(labels or [])))
        pipeline = build(task_uri, image)
        tic = time.perf_counter()
        log = _Tee(sys.stdout, verbose, labels)
        if not verbose:
            print(f"running {name} ({runner} runner); --verbose shows every task's log")
        try:
            with contextlib.redirect_stdout(log):
                pipeline()
            log.flush()
        except RuntimeError as err:  # kfp.local names the failed task; the task's log names the cause
            log.show_log_end()
            raise UserError(f"{_plain(str(err))} {log.cause()}See the task's log above.") from None
        except Exception as err:  # the container engine failed us (a task killed, an image gone)
            if runner != "docker" or type(err).__module__.split(".")[0] != "docker":
                raise
            log.show_log_end()
            raise UserError(f"task {log.current()!r}: the container engine failed: {_plain(str(err))[:300]} "
                            f"{log.cause()}Rerun with --verbose to see every task's log.") from None
    new = sorted(set(root.glob(f"{name}-*")) - before)
    if not new:
        raise UserError(f"the local run left no outputs under {root}")
    return new[-1], uri, time.perf_counter() - tic, log


@contextlib.contextmanager
def _root_logger_kept():
    """Put the root logger back as it was. kfp.local swaps its handlers and level for each task
    without a lock, so branches running at once can leave it at INFO with a handler on a stream
    that is gone by the next run in this process."""
    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    try:
        yield
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers


@contextlib.contextmanager
def _branches_at_once(branches: int):
    """Let every ParallelFor iteration run at once. kfp.local (2.17) runs at most two, a guard
    against nested loops multiplying threads; our loops are flat and small (one branch per model or
    tuning worker), and a third branch left waiting runs alone on a half-idle machine. Where kfp has
    no such class (another version), its own limit holds."""
    with _root_logger_kept():
        try:
            from kfp.local.orchestrator import enhanced_dag_orchestrator as orchestrator

            original = orchestrator.ParallelExecutor
        except (ImportError, AttributeError):
            yield
            return

        class AllBranches(original):
            def __init__(self, max_workers: int | None = None):
                super().__init__(max_workers)
                self.conservative_max = self.max_workers = max(branches, self.max_workers)

        orchestrator.ParallelExecutor = AllBranches
        try:
            yield
        finally:
            orchestrator.ParallelExecutor = original


class _Tee(io.TextIOBase):
    """Watch the task logs. Verbose: pass everything through. Otherwise print one line per finished
    task and keep the logs (minus the executor-input JSON) to show the end of them if a task fails.
    Either way a failed task's error line becomes the run's one-line cause, and each task's own
    start and finish lines give its wall time. ``labels`` name the ParallelFor iterations."""

    def __init__(self, stream, verbose: bool = False, labels: list[str] | None = None):
        self.stream, self.verbose, self.labels = stream, verbose, labels or []
        self.text: collections.deque[str] = collections.deque(maxlen=5000)
        self.log: collections.deque[str] = collections.deque(maxlen=15)
        self.pending, self.closing, self.opening = "", None, False
        self.traceback: int | None = None  # the indent of a traceback being skipped in self.log
        self.started: dict[str, float] = {}
        self.times: dict[str, float] = {}
        self.last_started = ""

    def write(self, text: str) -> int:
        self.pending += text
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            self._line(line + "\n")
        return len(text)

    def _line(self, line: str) -> None:
        self.text.append(line)
        plain = _strip_colours(line).rstrip()
        self._time(plain)
        if self.verbose:
            self.stream.write(line)
            return
        if self.opening:  # the "{" that opens the JSON: skip to its matching "}"
            self.opening, self.closing = False, plain[:-1] + "}"
        elif self.closing is not None:
            self.closing = None if plain == self.closing else self.closing
        elif plain.endswith("Got executor_input:"):
            self.opening = True
        elif plain.strip():
            indent = len(plain) - len(plain.lstrip())
            if self.traceback is not None and indent > self.traceback:
                return  # a frame: the exception's own line (as indented as "Traceback") is kept
            self.traceback = indent if plain.strip() == "Traceback (most recent call last):" else None
            if self.traceback is None:
                self.log.append(line)

    def flush(self) -> None:
        if self.pending:
            self._line(self.pending)
            self.pending = ""
        self.stream.flush()

    def _time(self, plain: str) -> None:
        # kfp.local's own start/finish lines get lost when parallel branches log at once; the
        # executor's are per task: the output file named in its input, and the one it wrote.
        if started := re.search(r"Executing task '([^']+)'$", plain):
            self.last_started = started[1]
        elif started := re.search(r'"outputFile": "(.+)/executor_output\.json"', plain):
            self.started[started[1]] = time.perf_counter()
        elif (done := re.search(r"Wrote executor output file to (.+)/executor_output\.json", plain)) \
                and done[1] in self.started:
            self.times[done[1]] = time.perf_counter() - self.started.pop(done[1])
            if not self.verbose:
                task, label = self._name(done[1])
                self.stream.write(f"  done  {f'{task} {label}'.strip():28s} {self.times[done[1]]:5.1f} s\n")

    def _name(self, path: str) -> tuple[str, str]:
        """A task's name and, in a ParallelFor branch, its iteration's label."""
        branch, task = Path(path).parent.name, Path(path).name
        index = re.fullmatch(r"for-loop-\d+-iteration-(\d+)", branch)
        if not index:
            return task, ""
        i = int(index[1])
        return task, self.labels[i] if i < len(self.labels) else str(i)

    def current(self) -> str:
        return self.last_started

    def task_times(self) -> dict[str, list[tuple[str, float]]]:
        """Seconds per task, from its executor's start to its outputs written; parallel branches
        are labelled."""
        found: dict[str, list[tuple[str, float]]] = collections.defaultdict(list)
        for path, seconds in sorted(self.times.items()):
            task, label = self._name(path)
            found[task].append((label, seconds))
        return dict(found)

    def show_log_end(self) -> None:
        """After a failure (not verbose): the last lines the tasks wrote, where the cause is."""
        if not self.verbose and self.log:
            self.stream.write("the tasks' last log lines (--verbose shows every line):\n" + "".join(self.log))
            self.stream.flush()

    def cause(self) -> str:
        errors = re.findall(r"^\s*[\w.]*(?:Error|Exception): (.+)$", _strip_colours("".join(self.text)), re.M)
        return f"Cause: {errors[-1].strip().rstrip('.')}. " if errors else ""


def _strip_colours(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _plain(text: str) -> str:
    """kfp.local's message without its terminal colour codes, on one line."""
    return " ".join(_strip_colours(text).split())


def evaluation_records(run_dir: Path) -> list[Path]:
    """Each branch's record for the compare step: its evaluate task's, or its train-evaluate task's."""
    return sorted(r for r in [*run_dir.rglob("evaluate/metrics"), *run_dir.rglob("train-evaluate/metrics")]
                  if r.is_file())


def _collect_reports(run_dir: Path) -> dict[str, Path]:
    """Copy every HTML report to <run>/reports/<name>.html, named after its step and model."""
    out = run_dir / "reports"
    out.mkdir(exist_ok=True)
    found = {}
    records = {r: json.loads(r.read_text()) for r in evaluation_records(run_dir)}
    seeds = collections.Counter(record["model"] for record in records.values())
    for report in sorted(run_dir.rglob("*report")):
        if not report.is_file():
            continue
        name = report.parent.name
        record = records.get(report.parent / "metrics")
        if record:  # one report per family, or per (family, seed) when a family has several
            name = f"evaluate-{branch_label(record['model'], record.get('seed', 0), seeds[record['model']], record.get('fold', -1))}"
        found[name] = out / f"{name}.html"
        shutil.copyfile(report, found[name])
    return found


def _summary(run_dir: Path, uri: str, seconds: float, task_times: dict[str, list[tuple[str, float]]]) -> None:
    # sys.stdout.write: kfp.local leaves builtins.print indented after a run
    def say(text: str = "") -> None:
        sys.stdout.write(text + "\n")

    say(f"\n{PIPELINE_NAME} finished in {seconds:.0f} s; outputs in {run_dir}")
    order = ["configure", "preprocess", "train", "evaluate", "train-evaluate", "compare"]
    say("task wall times (s): " + " | ".join(
        f"{name} " + ", ".join(f"{label} {t:.1f}".strip() for label, t in task_times[name])
        for name in sorted(task_times, key=lambda n: order.index(n) if n in order else len(order))) + "\n")
    comparison = next(run_dir.glob("compare/comparison"), None)
    if comparison:
        say(comparison.read_text())
    say("reports (self-contained HTML, open in a browser):")
    reports = _collect_reports(run_dir)
    width = max(map(len, reports), default=0)
    for name, path in reports.items():
        say(f"  {name:{width}s}  {path}")
    default = uri == f"sqlite:///{Path(DEFAULT_URI.removeprefix('sqlite:///')).resolve()}"
    how = "`make mlflow-ui`" if default else (
        f"`mlflow ui --backend-store-uri {uri}`" if uri.startswith("sqlite:") else f"{uri} in a browser")
    say(f"\nMLflow: {uri}\n  browse runs, curves and the registered champion with {how}"
        + (" (http://127.0.0.1:5000)" if uri.startswith("sqlite:") else ""))
