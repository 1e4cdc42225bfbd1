"""Adding a stage is one entry in the stage table and one notebook: nothing else is edited, and the
new stage runs in the Airflow DAG, in `helical-workflow run` and lands in the run folder."""

from __future__ import annotations

import json
import shutil

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from .conftest import AIRFLOW_BIN, ROOT, airflow_home, cli, demo_params, run

pytestmark = pytest.mark.slow

ENTRY = """    Stage(
        "summary", "05_summary.ipynb", ("load",), "summary",
        metrics=(_gauge("helical_summary_classes", "Classes in the loaded data"),),
    ),
)  # end of STAGES"""

CELLS = [
    new_markdown_cell("# 05 · Summary\n\nA one-line summary of the loaded data."),
    new_code_cell(
        'params_path = "../params/demo.yaml"\nrun_dir = "../outputs/demo/interactive"',
        metadata={"tags": ["parameters"]},
    ),
    new_code_cell("import json\n\nfrom helical_workflow.runs import open_run\n\nrun = open_run(params_path, run_dir)"),
    new_code_cell(
        'with run.work("summary") as m, run.output("summary") as out:\n'
        '    qc = json.loads((run.input("load") / "qc_summary.json").read_text())\n'
        '    (out / "summary.json").write_text(json.dumps({"classes": qc["n_labels"]}))\n'
        '    m.set("helical_summary_classes", qc["n_labels"])\n'
        "print(f\"{qc['n_labels']} classes\")"
    ),
]


def test_a_toy_fifth_stage_is_one_entry_and_one_notebook(tmp_path, model_cache, workflow_env):
    proj = tmp_path / "project"
    shutil.copytree(ROOT / "src", proj / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for folder in ("notebooks", "dags"):
        shutil.copytree(ROOT / folder, proj / folder)
    table = proj / "src" / "helical_workflow" / "stages.py"
    text = table.read_text()
    assert text.count(")  # end of STAGES") == 1
    table.write_text(text.replace("\n)  # end of STAGES", "\n" + ENTRY, 1))
    nb = new_notebook(
        cells=CELLS,
        metadata={"kernelspec": {"name": "helical-workflow", "display_name": "helical-workflow", "language": "python"}},
    )
    nbformat.write(nb, proj / "notebooks" / "05_summary.ipynb")
    params_path = demo_params(proj, model_cache=model_cache, fine_tune__epochs=1)

    env = airflow_home(
        tmp_path,
        workflow_env,
        proj / "params",
        PYTHONPATH=str(proj / "src"),
        HELICAL_WORKFLOW_HOME=str(proj),
        AIRFLOW__CORE__DAGS_FOLDER=str(proj / "dags"),
    )
    # the new task is in the DAG after its upstream; the heavy stages, which it does not need, are marked done
    r = run(
        [AIRFLOW_BIN / "airflow", "dags", "test", "helical_demo"]
        + ["--mark-success-pattern", "tokenize|fine_tune|evaluate|compare"],
        env=env,
        timeout=900,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]

    (run_dir,) = (tmp_path / "outputs" / "demo").iterdir()
    manifest = json.loads((run_dir / "run.json").read_text())
    assert set(manifest["stages"]) == {"load", "summary"}
    assert manifest["stages"]["summary"]["status"] == "success"
    assert json.loads((run_dir / "summary" / "summary.json").read_text()) == {"classes": 10}
    assert (run_dir / "reports" / "05_summary.html").exists()
    assert (
        'helical_summary_classes{experiment="demo",stage="summary"} 10.0'
        in (run_dir / "metrics" / "summary.prom").read_text()
    )

    # the same stage from a shell, against the same run folder
    r = cli("run", params_path, "--run-id", manifest["run_id"], "--stages", "summary", "--quiet", env=env, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert json.loads((run_dir / "run.json").read_text())["stages"]["summary"]["attempt"] == 2
