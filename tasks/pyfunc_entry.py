"""The code MLflow runs to build the registered model when it loads it ("models from code": the
model holds this file, not a pickle). The model itself is ``tasks.pyfunc_model.DiffadPyfuncModel``."""

import mlflow.models

from tasks.pyfunc_model import DiffadPyfuncModel

mlflow.models.set_model(DiffadPyfuncModel())
