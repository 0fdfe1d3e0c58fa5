"""num_threads holds every CPU thread pool a task uses, not only torch's: numpy's and scipy's OpenBLAS
and scikit-learn's OpenMP pools default to one thread per core and spin between calls."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO

CHECK = """
import json, numpy, scipy.linalg, torch
from dl_uncertainty.training.loop import set_threads
set_threads({n})
import sklearn.ensemble  # its OpenMP runtime loads after set_threads
from threadpoolctl import threadpool_info
print(json.dumps({{"torch": torch.get_num_threads(),
                  "pools": [(p["internal_api"], p["num_threads"]) for p in threadpool_info()]}}))
"""


def pools_after_set_threads(n: int) -> dict:
    env = {**{k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")},
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    out = subprocess.run([sys.executable, "-c", CHECK.format(n=n)], capture_output=True, text=True, env=env,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_one_thread_holds_for_torch_and_every_blas_and_openmp_pool():
    found = pools_after_set_threads(1)
    assert found["torch"] == 1
    assert {api for api, _ in found["pools"]} >= {"openblas", "openmp"}
    assert all(threads == 1 for _, threads in found["pools"]), found["pools"]
