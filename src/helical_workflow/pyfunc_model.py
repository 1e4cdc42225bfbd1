"""The registered model's code, logged as an MLflow "model from code" (no pickled Python object).

:func:`helical_workflow.registry.log_model` gives MLflow this file's path; MLflow copies it into the model and
runs it when the model is loaded, with the library installed (the kernel environment, the kernel image).
"""

import mlflow

from helical_workflow.registry import GeneformerClassifier

mlflow.models.set_model(GeneformerClassifier())
