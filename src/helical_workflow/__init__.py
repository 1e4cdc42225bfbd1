"""helical-workflow: a notebook-driven Geneformer workflow, papermilled by Airflow.

Light modules (stages, params, runs, launchers, sweep, tracking's Prometheus part, dag_factory) import
no torch or helical; data, tokenize, model, modeling, train, evaluate, compare and registry run in the kernel.
"""

__version__ = "0.1.0"
