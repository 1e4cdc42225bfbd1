"""The model registry: log a run's model as a pyfunc model, register it, move the champion alias, load it back;
and evaluate's frozen-embedding baseline (same in-process demo run)."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from helical_workflow import data, evaluate, modeling, registry, runs, train
from helical_workflow import model as model_mod
from helical_workflow import tokenize as tok
from helical_workflow.params import load_params

from .conftest import demo_params


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A demo run trained for one epoch and evaluated in-process, tracked in a temporary SQLite store."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HELICAL_WORKFLOW_OUTPUTS", str(root / "outputs"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        pp = demo_params(
            root,
            model_cache=root / "models",
            fine_tune__epochs=1,
            evaluate__umap=False,
            tracking__mlflow_tracking_uri=uri,
        )
        params = load_params(pp)
        rd = root / "run"
        data.load_stage(params, rd)
        tok.tokenize_stage(params, rd)
        train.fine_tune_stage(params, rd)
        metrics = evaluate.evaluate_stage(params, rd)
        yield SimpleNamespace(
            root=root,
            params=params,
            run_dir=rd,
            uri=uri,
            metrics=metrics,
            run_id=runs.read_manifest(rd)["mlflow"]["run_id"],
            info=json.loads((rd / "model" / "model_info.json").read_text()),
        )


@pytest.fixture(scope="module")
def logged(trained):
    """The run's model logged once into its MLflow run: (model URI, the run's status before and after)."""
    import mlflow

    client = mlflow.MlflowClient(trained.uri)
    before = client.get_run(trained.run_id).info.status
    uri = registry.log_model(
        trained.params,
        trained.run_dir / "model",
        mlflow_run_id=trained.run_id,
        tracking_uri=trained.uri,
        validation=trained.info["validation"],
    )
    return SimpleNamespace(model_uri=uri, status_before=before, status_after=client.get_run(trained.run_id).info.status)


def test_importing_the_registry_is_light():
    code = (
        "import sys, helical_workflow.registry; "
        "print(sorted(m for m in ('mlflow', 'torch', 'helical', 'pandas') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


@pytest.mark.slow
def test_frozen_embedding_baseline_is_reported_beside_the_expression_baseline(trained):
    m = trained.metrics
    for key in ("baseline_frozen", "baseline_logreg"):
        assert set(m[key]) == {"accuracy", "macro_f1"}
        assert all(0.0 <= v <= 1.0 for v in m[key].values())
    assert {"accuracy", "macro_f1", "chance_accuracy", "n_cells", "per_class", "confusion_matrix"} <= set(m)
    on_disk = json.loads((trained.run_dir / "evaluate" / "metrics.json").read_text())
    assert on_disk["baseline_frozen"] == m["baseline_frozen"]


@pytest.mark.slow
def test_registered_champion_loads_back_to_the_runs_own_logits(trained, logged, tmp_path):
    import mlflow
    import pandas as pd

    assert logged.model_uri.startswith("models:/")
    assert logged.status_after == logged.status_before  # logging into the run left its status as it was
    decision = registry.register(
        trained.params,
        model_uri=logged.model_uri,
        metric="val_macro_f1",
        value=trained.info["validation"]["macro_f1"],
        promote="if_better",
        tracking_uri=trained.uri,
    )
    assert decision["name"] == "demo" and decision["version"] == "1" and decision["promoted"]
    assert decision["champion_version_before"] is None and "becomes champion" in decision["reason"]

    folder = registry.load("models:/demo@champion", trained.uri, tmp_path / "champion")
    assert folder == (tmp_path / "champion").resolve()
    for name in ("fine_tuned.pt", "labels.json", "model_info.json", "workflow.json", "registered.json"):
        assert (folder / name).is_file(), name
    paths = model_mod.model_paths(registry.package_params(folder))
    for name in model_mod.DICTIONARIES:
        assert (paths["version_dir"] / name).is_file(), name
    assert (paths["model_files_dir"] / "config.json").is_file()
    wf = json.loads((folder / "workflow.json").read_text())
    assert wf["model_name"] == trained.params.model.name and wf["label_key"] == "bulk_labels"
    assert wf["tokenize"] == trained.params.tokenize.model_dump(mode="json")
    assert wf["fine_tune"]["epochs"] == 1 and wf["validation"] == trained.info["validation"]
    assert wf["model_spec"]["input_size"] == 2048 and wf["model_spec"]["special_token"] is False
    assert json.loads((folder / "registered.json").read_text())["version"] == "1"

    # the test split through the run's own model/ and through the registered package: the same logits
    store = modeling.TokenStore(tok.load_tokenized(trained.run_dir))
    idx = store.indices("test")
    model, labels = modeling.load_trained(trained.params, trained.run_dir, batch_size=16, device="cpu")
    expected, expected_emb = modeling.predict(
        model, store, idx, batch_size=16, device="cpu", precision="fp32", pad_id=model.pad_token_id
    )
    packaged = registry.open_package(folder, device="cpu", batch_size=16)
    assert packaged.labels == labels and packaged.names == wf["labels"]
    logits, emb = packaged.predict([store.get(int(i)) for i in idx])
    assert np.array_equal(logits, expected) and np.array_equal(emb, expected_emb)

    # and as an MLflow pyfunc model, with its signature and input example
    with registry._tracking_at(trained.uri):
        info = mlflow.models.get_model_info("models:/demo@champion")
        pyfunc = mlflow.pyfunc.load_model("models:/demo@champion")
    assert info.signature is not None and info.saved_input_example_info is not None
    assert [c.name for c in info.signature.inputs.inputs] == ["input_ids"]
    out = pyfunc.predict(pd.DataFrame({"input_ids": [store.get(int(i)).tolist() for i in idx]}))
    assert np.array_equal(out, expected.astype(np.float32))


@pytest.mark.slow
def test_the_champion_moves_only_as_promote_says(trained, logged):
    import mlflow

    params = trained.params.model_copy(update={"experiment": "demo-rules"})
    client = mlflow.MlflowClient(trained.uri)

    def reg(value, promote="if_better"):
        return registry.register(
            params,
            model_uri=logged.model_uri,
            metric="val_macro_f1",
            value=value,
            promote=promote,
            tracking_uri=trained.uri,
        )

    def champion():
        version = client.get_registered_model("demo-rules").aliases.get("champion")
        return None if version is None else str(version)

    assert reg(0.65)["promoted"] and champion() == "1"
    d = reg(0.612)
    assert not d["promoted"] and champion() == "1"
    assert d["champion_version_before"] == "1" and d["champion_value_before"] == 0.65
    assert d["reason"] == "not better than champion v1 (0.650 >= 0.612)"
    assert client.get_model_version("demo-rules", "2").tags["val_macro_f1"] == "0.612"
    assert not reg(0.65)["promoted"] and champion() == "1"  # strictly greater
    d = reg(0.712)
    assert d["promoted"] and champion() == "4"
    assert d["reason"] == "0.712 > 0.650: champion moves from v1 to v4"
    d = reg(0.1, "always")
    assert d["promoted"] and champion() == "5" and d["champion_version_before"] == "4"
    d = reg(0.99, "never")
    assert not d["promoted"] and champion() == "5" and "never" in d["reason"]
    with pytest.raises(ValueError, match="promote must be"):
        reg(0.5, "sometimes")


@pytest.mark.slow
def test_missing_models_and_aliases_fail_with_a_fix(trained, logged):
    params = trained.params.model_copy(update={"experiment": "demo-nochamp"})
    registry.register(
        params, model_uri=logged.model_uri, metric="val_macro_f1", value=0.5, promote="never", tracking_uri=trained.uri
    )
    with pytest.raises(registry.RegistryError, match="no model registered under 'nothing-here'"):
        registry.load("models:/nothing-here@champion", trained.uri)
    with pytest.raises(
        registry.RegistryError,
        match=r"no model registered under 'demo-nochamp' with alias 'champion'\. Fix: run a training DAG first "
        r"or give models:/demo-nochamp/<version>",
    ):
        registry.load("models:/demo-nochamp@champion", trained.uri)
    with pytest.raises(registry.RegistryError, match="'demo-nochamp' version 7"):
        registry.load("models:/demo-nochamp/7", trained.uri)
    with pytest.raises(ValueError, match="not a registered-model reference"):
        registry.load("demo-nochamp@champion", trained.uri)
    assert registry.parse_model_ref("models:/demo/3") == ("demo", "3", None)
