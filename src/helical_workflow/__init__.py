"""helical-workflow: a notebook-driven Geneformer workflow, papermilled by Airflow.

Light modules (params, runs, launch, tracking's Prometheus part, dag_factory) import no
torch or helical; data, tokenize, model, train and evaluate run in the kernel.
"""

__version__ = "0.1.0"
