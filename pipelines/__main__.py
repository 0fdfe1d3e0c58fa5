"""python -m pipelines {compile,run-local,upload,run} [options] [hydra overrides...]

  compile    write the pipeline YAML for a cluster (defaults composed from configs/)
  run-local  run the whole pipeline here with kfp.local (--runner docker: in the image)
  upload     compile and upload to Kubeflow Pipelines (a new version if it exists)
  run        start a run of the latest uploaded version and wait for it

compile, upload and run-local take --pipeline tuning for the Optuna sweep (tuning-pipeline).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from dl_uncertainty.cli import OneLineParser
from dl_uncertainty.errors import UserError, check_writable

PIPELINES = ("uncertainty", "tuning")


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m pipelines", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{compile,run-local,upload,run}")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.epochs=5 model.dropout=0.1")
        return cmd

    for name, help_text in (("compile", "compile the pipeline YAML for a cluster"),
                            ("upload", "compile and upload to KFP (new version if the pipeline exists)"),
                            ("run", "run the latest uploaded version and wait for it")):
        cmd = command(name, help_text)
        cmd.add_argument("--no-gpu", action="store_true", help="do not request GPUs (CPU image everywhere)")
        cmd.add_argument("--output", default=None, help="where the YAML goes (build/<pipeline>_pipeline.yaml)")
        if name != "run":
            cmd.add_argument("--pipeline", choices=PIPELINES, default="uncertainty", help="which pipeline")
        if name != "compile":
            cmd.add_argument("--host", default="http://localhost:8080", help="KFP API / UI address")
        if name == "run":
            cmd.add_argument("--experiment", default=None, help="KFP experiment (default: experiment_name)")
            cmd.add_argument("--no-wait", action="store_true", help="return once the run is created")
            cmd.add_argument("--timeout", type=int, default=3600, help="seconds to wait for the run")
    local = command("run-local", "run the whole pipeline locally with kfp.local")
    local.add_argument("--runner", choices=("subprocess", "docker"), default="subprocess",
                       help="subprocess: tasks run in this environment; docker: in the project image "
                            "(make image-cpu), through Docker or podman's socket (DOCKER_HOST)")
    local.add_argument("--pipeline-root", default="local_outputs", help="where task outputs go")
    local.add_argument("--verbose", action="store_true", help="print every task's whole log (default: one line per task)")
    local.add_argument("--pipeline", choices=PIPELINES, default="uncertainty", help="which pipeline")
    return parser


def _output(args: argparse.Namespace) -> str:
    """Where the YAML goes, checked before compiling: a .yaml file in a writable folder."""
    path = args.output or f"build/{getattr(args, 'pipeline', 'uncertainty')}_pipeline.yaml"
    if os.path.isdir(path):
        raise UserError(f"--output {path} is a folder; give a file, e.g. {os.path.join(path, 'pipeline.yaml')}")
    if not path.endswith((".yaml", ".yml")):
        raise UserError(f"--output {path} must end with .yaml (the pipeline is written as YAML)")
    folder = os.path.dirname(path) or "."
    blocker = next((p for p in (folder, *map(str, Path(folder).parents)) if os.path.exists(p) and not os.path.isdir(p)),
                   None)
    if blocker:
        raise UserError(f"--output {path}: {blocker} is a file, not a folder")
    check_writable(folder, "--output")
    return path


class Terminated(KeyboardInterrupt):
    """SIGTERM, ended like Ctrl-C: what the run started stops with it."""


def _terminate(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.command == "compile":
            from pipelines.compile import compile_pipeline

            path = compile_pipeline(args.overrides, _output(args), gpu=not args.no_gpu, pipeline=args.pipeline)
            print(f"compiled {path}")
        elif args.command == "run-local" and not args.pipeline_root.strip():
            raise UserError("--pipeline-root is empty; give the folder task outputs go to (default local_outputs)")
        elif args.command == "run-local" and args.pipeline == "tuning":
            from pipelines.tuning import run_tuning_local

            if args.runner != "subprocess":
                raise UserError("the tuning pipeline runs locally with --runner subprocess only; "
                                "`make tune` runs the same study without KFP")

            run_tuning_local(args.overrides, args.pipeline_root, verbose=args.verbose)
        elif args.command == "run-local":
            from pipelines.local import run_local

            run_local(args.overrides, args.pipeline_root, verbose=args.verbose, runner=args.runner)
        elif args.command == "upload":
            from pipelines.compile import compile_pipeline
            from pipelines.delivery import upload

            path = compile_pipeline(args.overrides, _output(args), gpu=not args.no_gpu, pipeline=args.pipeline)
            upload(args.host, path, **({"name": "tuning-pipeline"} if args.pipeline == "tuning" else {}))
        else:
            from pipelines.delivery import run

            run(args.host, args.overrides, experiment=args.experiment, wait=not args.no_wait,
                timeout=args.timeout)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: the tasks' processes stop too, and no traceback
        _stop_children()
        terminated = isinstance(err, Terminated)
        print(f"error: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        code = 128 + (signal.SIGTERM if terminated else signal.SIGINT)
        if threading.active_count() > 1:  # kfp.local's branch threads would wait for tasks no longer there
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    return 0


def _descendants(pid: int) -> list[int]:
    """This process's children, theirs, and so on (Linux's /proc; elsewhere none are found)."""
    children: dict[int, list[int]] = {}
    for entry in (e for e in (os.listdir("/proc") if os.path.isdir("/proc") else []) if e.isdigit()):
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            continue
        if fields[0] != "Z":  # a zombie has exited already
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stop_children(grace_s: float = 5.0) -> None:
    """SIGTERM every process this one started (task subprocesses, an MLflow server), SIGKILL after ``grace_s``."""
    deadline = time.monotonic() + grace_s
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _descendants(os.getpid()):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        while _descendants(os.getpid()) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _descendants(os.getpid()):
            return


if __name__ == "__main__":
    sys.exit(main())
