from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Output

from components.images import CUDA_IMAGE


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def tune_trials(study: Input[Artifact], worker: int, trials: Output[Metrics]):
    """One worker: run its share of the study's trials, each a nested MLflow run, in the shared study."""
    from dl_uncertainty.training.tuning import Sweep, work

    sweep = Sweep.from_json(open(study.path).read())
    trials.log_metric("trials", work(sweep, worker, sweep.cfg.tune.workers))
    trials.log_metric("worker", worker)
