"""What each pipeline step imports: every kfp.local task is a fresh Python, so a heavy import that a
step never uses costs each run its seconds (torch alone about one)."""

import os
import subprocess
import sys

from tests.conftest import REPO


def loaded_after(statement: str, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh interpreter has loaded after running ``statement``."""
    check = f"import sys; {statement}; print(','.join(m for m in {modules!r} if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=120, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_the_compare_step_loads_neither_torch_nor_scikit_learn_nor_scipys_optimizers():
    # everything compare_models imports, including the tuning section's lookup of a run's study tag
    statement = ("import components.compare; from dl_uncertainty import steps; "
                 "from dl_uncertainty.tracking import compare, folds, seeds, store; "
                 "from dl_uncertainty.uncertainty import metrics; from dl_uncertainty.config import compose")
    assert loaded_after(statement, ("torch", "sklearn", "scipy.optimize")) == []

