"""Airflow DAGs: one per params/<experiment>.yaml with a `dag:` section (load >> tokenize >> fine_tune >>
evaluate >> compare), and `helical_annotate`, which annotates new .h5ad files with the experiment's model.

Thin on purpose: the DAGs are built from the stage tables by helical_workflow.dag_factory.
"""

from helical_workflow.dag_factory import build_dags

globals().update(build_dags())
