"""The tracking layer: MLflow runs, the logged pyfunc model, the model bundle, the champion."""
