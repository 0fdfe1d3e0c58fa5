"""MLflow "models from code" entry point: the logged model is this file, not a pickle."""

from mlflow.models import set_model

from dl_uncertainty.tracking import UncertaintyModel

set_model(UncertaintyModel())
