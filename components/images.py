"""The one place that names the component images (read when components are defined/compiled).

``DLU_IMAGE_REPO`` / ``DLU_IMAGE_TAG`` override the defaults; ``make images`` builds
``<repo>:<tag>`` (CPU) and ``<repo>:<tag>-cuda`` with the same names. The tag defaults to the
current git commit, never ``latest``: KFP's cache and IfNotPresent pulls key on the tag string.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def _git_tag() -> str:
    repo = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "nogit"
    return f"{sha}-dirty" if sha and dirty else (sha or "nogit")


REPO = os.environ.get("DLU_IMAGE_REPO", "dl-uncertainty")
TAG = os.environ.get("DLU_IMAGE_TAG") or _git_tag()
if TAG == "latest":
    raise ValueError("DLU_IMAGE_TAG=latest is not allowed: use an immutable tag such as the git SHA")

CPU_IMAGE = f"{REPO}:{TAG}"
CUDA_IMAGE = f"{REPO}:{TAG}-cuda"
