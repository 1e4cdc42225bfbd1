"""The params schema: valid files load; every problem is named with its field and fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helical_workflow.params import ParamsError, load_params

from .conftest import AIRFLOW_BIN, DEMO_DATA, KERNEL_PY, ROOT, demo_params, run


def write(tmp_path: Path, raw: dict, name: str = "exp.yaml") -> Path:
    pdir = tmp_path / "params"
    pdir.mkdir(exist_ok=True)
    (pdir / "profiles.yaml").write_text((ROOT / "params" / "profiles.yaml").read_text())
    p = pdir / name
    p.write_text(yaml.safe_dump(raw))
    return p


def base() -> dict:
    return {"experiment": "x", "data": {"path": str(DEMO_DATA), "label_key": "bulk_labels"}}


def problems(path: Path) -> list[str]:
    with pytest.raises(ParamsError) as e:
        load_params(path)
    return e.value.problems


def test_shipped_params_files_validate():
    demo = load_params(ROOT / "params" / "demo.yaml")
    assert demo.model.source == "local_tiny" and demo.profile_for("fine_tune").device == "cpu"
    yolk = load_params(ROOT / "params" / "yolksac_geneformer.yaml", check_files=False)
    assert yolk.model.name == "gf-6L-10M-i2048"
    assert yolk.profile_for("fine_tune").device == "cuda" and yolk.profile_for("load").device == "cpu"


def test_relative_paths_resolve_from_project_root():
    p = load_params(ROOT / "params" / "demo.yaml")
    assert p.data_path == DEMO_DATA


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    raw = base()
    raw["fine_tune"] = {"epoch": 3}
    (msg,) = problems(write(tmp_path, raw))
    assert msg.startswith("fine_tune.epoch: unknown key")
    assert "Did you mean 'epochs'" in msg


def test_wrong_type_names_field_and_value(tmp_path):
    raw = base()
    raw["fine_tune"] = {"epochs": "many", "learning_rate": -1}
    msgs = problems(write(tmp_path, raw))
    assert any(m.startswith("fine_tune.epochs:") and "'many'" in m for m in msgs)
    assert any(m.startswith("fine_tune.learning_rate:") and "greater than 0" in m for m in msgs)


def test_unknown_model_name(tmp_path):
    raw = base()
    raw["model"] = {"name": "gf-6L-10M-i2049"}
    (msg,) = problems(write(tmp_path, raw))
    assert msg.startswith("model.name:") and "Did you mean 'gf-6L-10M-i2048'" in msg


def test_missing_required_sections(tmp_path):
    msgs = problems(write(tmp_path, {"experiment": "x"}))
    assert msgs == ["data: required but missing. Fix: add it to the file."]


def test_split_fractions_must_sum_to_one(tmp_path):
    raw = base()
    raw["data"]["split"] = {"train": 0.5, "validation": 0.1, "test": 0.1}
    (msg,) = problems(write(tmp_path, raw))
    assert msg.startswith("data.split:") and "add up to 0.7" in msg


def test_unknown_profile(tmp_path):
    raw = base()
    raw["profile"] = "tpu"
    (msg,) = problems(write(tmp_path, raw))
    assert msg.startswith("profile: unknown resource profile 'tpu'") and "cpu, cpu-docker, gpu, gpu-k8s" in msg


def test_missing_and_broken_data_files(tmp_path):
    raw = base()
    raw["data"]["path"] = str(tmp_path / "nope.h5ad")
    (msg,) = problems(write(tmp_path, raw))
    assert msg.startswith("data.path: file not found")
    junk = tmp_path / "junk.h5ad"
    junk.write_text("not hdf5")
    raw["data"]["path"] = str(junk)
    (msg,) = problems(write(tmp_path, raw))
    assert "not an HDF5/.h5ad file" in msg


def test_not_yaml(tmp_path):
    p = write(tmp_path, base())
    p.write_text("experiment: [unclosed\n")
    (msg,) = problems(p)
    assert msg.startswith("not valid YAML")


def test_an_unknown_profile_is_reported_with_the_schema_problems(tmp_path):
    raw = base()
    raw["fine_tune"] = {"epochs": 0}
    raw["profile"], raw["stage_profiles"] = "nosuch", {"fine_tune": "alsonot"}
    msgs = problems(write(tmp_path, raw))
    assert msgs[0].startswith("fine_tune.epochs:")
    assert any(m.startswith("profile: unknown resource profile 'nosuch'") and "Fix:" in m for m in msgs)
    assert any(m.startswith("stage_profiles.fine_tune: unknown resource profile 'alsonot'") for m in msgs)


@pytest.mark.parametrize("venv_bin", [KERNEL_PY.parent, AIRFLOW_BIN], ids=["kernel-env", "airflow-env"])
def test_cli_validate_explains_and_exits_nonzero(tmp_path, venv_bin):
    raw = base()
    raw["fine_tune"] = {"epochs": 0, "bogus": 1}
    bad = write(tmp_path, raw)
    r = run([venv_bin / "helical-workflow", "validate", bad])
    assert r.returncode == 1
    assert "fine_tune.epochs: Input should be greater than or equal to 1 (got 0)" in r.stderr
    assert "fine_tune.bogus: unknown key" in r.stderr
    ok = run(
        [
            venv_bin / "helical-workflow",
            "validate",
            ROOT / "params" / "demo.yaml",
            ROOT / "params" / "yolksac_geneformer.yaml",
            ROOT / "params" / "profiles.yaml",
        ]
    )
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout and "yolksac_geneformer" in ok.stdout


def test_cli_validate_checks_the_label_column(tmp_path, model_cache):
    p = demo_params(tmp_path, model_cache=model_cache, data__label_key="cell_type")
    r = run([KERNEL_PY.parent / "helical-workflow", "validate", p])
    assert r.returncode == 1
    assert "data.label_key: column 'cell_type' is not in adata.obs" in r.stderr
    assert "bulk_labels" in r.stderr  # the columns it could have named


def test_the_launcher_table_serves_every_launcher_a_profile_can_name(tmp_path, model_cache, workflow_env):
    """One table (launchers.LAUNCHERS) for `helical-workflow run` and the DAG factory: every launcher of the
    schema is in it, and a launcher only Airflow can start says so from a shell, with the fix."""
    from typing import get_args

    from helical_workflow import launchers
    from helical_workflow.params import Profile
    from helical_workflow.runs import Run

    assert set(launchers.LAUNCHERS) == set(get_args(Profile.model_fields["launcher"].annotation))
    src = (ROOT / "src" / "helical_workflow" / "dag_factory.py").read_text()
    assert all(f"def {la.airflow_task}(" in src for la in launchers.LAUNCHERS.values())
    run = Run.create(demo_params(tmp_path, model_cache=model_cache, profile="gpu-k8s"), "k8s-from-a-shell")
    with pytest.raises(launchers.StageFailed, match="kubernetes launcher: pods are started by Airflow.*Fix: trigger"):
        launchers.launch(run, "load")


def test_a_params_file_outside_params_resolves_relative_paths_from_its_own_folder_as_its_help_says(tmp_path):
    from helical_workflow.params import DataParams

    raw = yaml.safe_load((ROOT / "params" / "demo.yaml").read_text())
    raw["data"]["path"] = "data/x.h5ad"
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(raw))
    p = load_params(tmp_path / "exp.yaml", check_files=False)
    assert p.data_path == tmp_path / "data" / "x.h5ad"
    help_text = DataParams.model_fields["path"].description
    assert "the params file's own folder when it is not in a params/ folder" in help_text


def test_one_seed_fills_every_seed_the_file_leaves_out(tmp_path):
    raw = {**base(), "seed": 7, "sweep": {"grid": {"fine_tune.learning_rate": [0.001, 0.002]}}}
    p = load_params(write(tmp_path, raw))
    assert (p.seed, p.data.split.seed, p.model.seed, p.sweep.seed) == (7, 7, 7, 7)
    raw["data"]["split"] = {"seed": 3}  # a section's own seed wins
    p = load_params(write(tmp_path, raw))
    assert (p.data.split.seed, p.model.seed) == (3, 7)
    assert p.snapshot()["seed"] == 7  # recorded in run.json and MLflow with the params
    assert load_params(write(tmp_path, base())).model.seed == 0 and load_params(write(tmp_path, base())).seed is None
