"""MLflow "models from code" entry point: the logged model is this file, not a pickle."""

from mlflow.models import set_model

from dl_uncertainty.tracking.runs import UncertaintyModel

set_model(UncertaintyModel())
