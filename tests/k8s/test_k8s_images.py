"""Static checks of the container image definition: hadolint, pinned bases, a minimal build
context, a non-root user, and nothing but the installable project copied in."""

from __future__ import annotations

import re
from pathlib import Path

from k8s_helpers import REPO_ROOT, rel, run

DOCKERFILE = REPO_ROOT / "images" / "Dockerfile"


def _dockerfiles() -> list[Path]:
    skip = {".venv", ".git", "node_modules", "build"}
    return sorted(
        p
        for p in REPO_ROOT.rglob("*Dockerfile*")
        if p.is_file() and not skip & set(p.relative_to(REPO_ROOT).parts)
    )


def test_hadolint_passes_on_every_dockerfile(hadolint: str):
    files = _dockerfiles()
    assert DOCKERFILE in files
    for path in files:
        result = run([hadolint, "--no-color", "--failure-threshold", "info", str(path)])
        assert result.returncode == 0, f"hadolint {rel(path)}:\n{result.stdout}{result.stderr}"


def test_hadolint_can_fail(hadolint: str, tmp_path: Path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\n")
    result = run([hadolint, "--no-color", str(bad)])
    assert result.returncode != 0 and "DL3006" in result.stdout


def _arg_defaults(text: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG\s+([A-Z_]+)=(\S+)", text, re.M))


def test_base_images_and_torch_are_pinned():
    text = DOCKERFILE.read_text()
    args = _arg_defaults(text)
    assert args["VARIANT"] == "cpu"
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", args["CPU_BASE_IMAGE"])
    assert re.fullmatch(
        r"pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime", args["CUDA_BASE_IMAGE"]
    )
    assert args["TORCH_VERSION"] == "2.13.0"
    assert args["CUDA_BASE_IMAGE"].split(":")[1].startswith(args["TORCH_VERSION"] + "-"), (
        "CUDA base must ship the same torch release as the CPU variant"
    )
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
    assert ":latest" not in text
    for line in re.findall(r"^FROM\s+(\S+)", text, re.M):
        assert line.startswith("${") or line.startswith("base-"), f"unpinned FROM {line}"


def test_image_copies_only_the_project_and_runs_unprivileged():
    text = DOCKERFILE.read_text()
    copies = re.findall(r"^COPY\s+(.+)$", text, re.M)
    sources = [part for line in copies for part in line.split()[:-1] if not part.startswith("--")]
    assert sorted(sources) == ["README.md", "configs/", "pyproject.toml", "src/"]
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users, "image must switch to an unprivileged USER"
    uid = users[-1].split(":")[0]
    assert uid not in {"0", "root"}
    assert "import dl_uncertainty" in text and "kfp" in text, "build must prove the imports work"
    assert not re.search(r"(?i)^(ENV|ARG)\s+\S*(PASSWORD|SECRET|TOKEN|ACCESS_KEY)", text, re.M)


def test_dockerignore_keeps_the_context_minimal():
    lines = [
        ln.strip()
        for ln in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    assert lines[0] == "*", ".dockerignore must start by excluding everything"
    allowed = {ln[1:] for ln in lines if ln.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "src/", "configs/"}
    for required in ("**/__pycache__", "**/*.egg-info"):
        assert required in lines
