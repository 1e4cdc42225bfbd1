"""Airflow DAGs, one per params/<experiment>.yaml with a `dag:` section: load >> tokenize >> fine_tune >> evaluate.

Thin on purpose: the DAGs are built by helical_workflow.dag_factory from the params files.
"""

from helical_workflow.dag_factory import build_dags

globals().update(build_dags())
