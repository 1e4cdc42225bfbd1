"""The model registry: log a run's model as a pyfunc model, register it, move the champion alias, load it back,
in the embedded SQLite store and against an MLflow server started as the compose stack starts it;
and evaluate's frozen-embedding baseline (same in-process demo run)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest

from helical_workflow import model as model_mod
from helical_workflow import modeling, registry, runs
from helical_workflow import tokenize as tok

from .conftest import ROOT, compose_mlflow_command, mlflow_server_at, trained_demo


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A demo run trained for one epoch and evaluated in-process (conftest.trained_demo)."""
    with trained_demo(tmp_path_factory.mktemp("registry")) as t:
        yield t


@pytest.fixture(scope="module")
def logged(trained):
    """The run's model logged once into its MLflow run: (model URI, the run's status before and after)."""
    import mlflow

    client = mlflow.MlflowClient(trained.uri)
    from helical_workflow.card import model_card

    before = client.get_run(trained.run_id).info.status
    run = runs.Run.load(trained.run_dir)
    card, summary = model_card(run, run, info=trained.info, metrics=trained.metrics)
    uri = registry.log_model(
        trained.params,
        trained.run_dir / "model",
        mlflow_run_id=trained.run_id,
        tracking_uri=trained.uri,
        validation=trained.info["validation"],
        card=card,
    )
    status_after = client.get_run(trained.run_id).info.status
    return SimpleNamespace(model_uri=uri, status_before=before, status_after=status_after, card=card, summary=summary)


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
    for key in ("baseline_frozen", "baseline_logreg", "baseline_majority"):  # each with its 95 % intervals
        assert set(m[key]) == {"accuracy", "macro_f1", "accuracy_ci", "macro_f1_ci"}
        for metric in ("accuracy", "macro_f1"):
            lo, hi = m[key][f"{metric}_ci"]
            assert 0.0 <= lo <= m[key][metric] <= hi <= 1.0
    assert {"accuracy", "macro_f1", "chance_accuracy", "n_cells", "per_class", "confusion_matrix"} <= set(m)
    # the model's own intervals: accuracy, macro-F1 and each class's F1, and how they were computed
    assert m["accuracy_ci"][0] <= m["accuracy"] <= m["accuracy_ci"][1]
    assert m["macro_f1_ci"][0] <= m["macro_f1"] <= m["macro_f1_ci"][1]
    assert all(len(c["f1_ci"]) == 2 for c in m["per_class"].values() if c["support"])
    assert m["intervals"] == {
        "method": "percentile bootstrap over test cells",
        "resamples": 1000,
        "level": 0.95,
        "seed": 0,
    }
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
        description=logged.summary,
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

    # the model card travels with the model, and its summary is the version's description
    card = (folder / "model_card.md").read_text()
    assert card == logged.card
    for part in (
        "## Data",
        "sha256",
        "| CD14+ Monocyte |",
        "## Model and fine-tuning",
        "Kept: epoch 1 of 1",
        "logistic regression (expression)",
        "Weakest classes:",
        "## Intended use and limits",
        "not for biological conclusions",
    ):
        assert part in card, part
    description = mlflow.MlflowClient(trained.uri).get_model_version("demo", "1").description
    assert description == logged.summary and "test macro-F1" in description

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

    # registry.name names the registered model (default: the experiment)
    named = trained.params.registry.model_copy(update={"name": "demo-rules"})
    params = trained.params.model_copy(update={"experiment": "demo-rules-exp", "registry": named})
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
    assert "demo-rules-exp" not in [m.name for m in client.search_registered_models()]


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


# ------------------------------------------------------- the compose stack's MLflow server ---

COMPOSE = ROOT / "compose"


def test_the_compose_mlflow_server_is_the_kernels_mlflow():
    """Clients (notebooks, the kernel image) run the kernel environment's MLflow: the server is the same release,
    serves artifacts (clients upload over HTTP, never to a path of their own) and accepts compose's host name."""
    from importlib.metadata import version

    image = re.search(r"^FROM ghcr\.io/mlflow/mlflow:v(\S+)", (COMPOSE / "mlflow.Dockerfile").read_text(), re.M)
    assert image and image.group(1) == version("mlflow"), "compose/mlflow.Dockerfile: use the kernel.lock release"
    cmd = compose_mlflow_command()
    assert cmd[:2] == ["mlflow", "server"] and "--serve-artifacts" in cmd
    assert "--artifacts-destination=/mlartifacts" in cmd and not any(
        a.startswith("--default-artifact-root") for a in cmd
    )
    hosts = next(a for a in cmd if a.startswith("--allowed-hosts=")).removeprefix("--allowed-hosts=").split(",")
    assert "mlflow:5000" in hosts  # MLFLOW_TRACKING_URI=http://mlflow:5000 in the stack


def _http(url: str, host: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` started with the compose service's command line (see :func:`conftest.mlflow_server_at`)."""
    with mlflow_server_at(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


@pytest.mark.slow
def test_the_registry_works_the_same_against_the_compose_mlflow_server(trained, mlflow_server, tmp_path, monkeypatch):
    """log_model, register (champion, if_better), load by alias: over HTTP, artifacts uploaded to and downloaded
    from the server, as in the compose stack. The tracking URI is the argument, whatever the environment says."""
    import mlflow
    import pandas as pd

    url = mlflow_server.url
    decoy = tmp_path / "decoy.db"  # an environment pointing elsewhere must not be used
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{decoy}")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{decoy}")
    client_cwd = tmp_path / "cwd"  # nothing may be written relative to the client's working directory
    client_cwd.mkdir()
    monkeypatch.chdir(client_cwd)

    # the run's MLflow run on the server, created as the workflow creates it (a copy: the fixture's run stays)
    params = trained.params.model_copy(
        update={"tracking": trained.params.tracking.model_copy(update={"mlflow_tracking_uri": url})}
    )
    run_dir = tmp_path / "run"
    shutil.copytree(trained.run_dir, run_dir, symlinks=True)
    run = runs.Run(params, run_dir)
    server_run_id = run.mlflow.id
    run.mlflow.log_artifacts(run_dir / "model", "model")
    assert not runs.read_manifest(run_dir).get("warnings")
    client = mlflow.MlflowClient(tracking_uri=url, registry_uri=url)
    exp = client.get_experiment_by_name(params.experiment)
    assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location

    model_uri = registry.log_model(
        params, run_dir / "model", mlflow_run_id=server_run_id, tracking_uri=url, validation=trained.info["validation"]
    )
    assert model_uri.startswith("models:/")
    value = trained.info["validation"]["macro_f1"]
    first = registry.register(
        params, model_uri=model_uri, metric="val_macro_f1", value=value, promote="if_better", tracking_uri=url
    )
    assert first["version"] == "1" and first["promoted"] and "becomes champion" in first["reason"]

    # a second, worse model (another run) does not move the alias under if_better
    worse_run = client.create_run(exp.experiment_id, run_name="worse").info.run_id
    worse_uri = registry.log_model(
        params, run_dir / "model", mlflow_run_id=worse_run, tracking_uri=url, validation={"macro_f1": value - 0.25}
    )
    assert worse_uri != model_uri
    second = registry.register(
        params, model_uri=worse_uri, metric="val_macro_f1", value=value - 0.25, promote="if_better", tracking_uri=url
    )
    assert second["version"] == "2" and not second["promoted"]
    assert second["champion_version_before"] == "1" and second["champion_value_before"] == value
    assert client.get_registered_model(params.experiment).aliases == {"champion": "1"}
    assert client.get_model_version(params.experiment, "2").run_id == worse_run

    folder = registry.load(f"models:/{params.experiment}@champion", url, tmp_path / "champion")
    record = json.loads((folder / "registered.json").read_text())
    assert record["version"] == "1" and record["run_id"] == server_run_id and record["tracking_uri"] == url

    # the test split: the run's own model/ and the champion loaded from the server give the same logits
    store = modeling.TokenStore(tok.load_tokenized(trained.run_dir))
    idx = store.indices("test")
    model, labels = modeling.load_trained(trained.params, trained.run_dir, batch_size=16, device="cpu")
    expected, _ = modeling.predict(
        model, store, idx, batch_size=16, device="cpu", precision="fp32", pad_id=model.pad_token_id
    )
    logits = registry.predict_logits(folder, [store.get(int(i)) for i in idx], device="cpu", batch_size=16)
    assert np.array_equal(logits, expected)
    with registry._tracking_at(url):  # and as an MLflow pyfunc model
        pyfunc = mlflow.pyfunc.load_model(f"models:/{params.experiment}@champion")
    out = pyfunc.predict(pd.DataFrame({"input_ids": [store.get(int(i)).tolist() for i in idx]}))
    assert np.array_equal(out, expected.astype(np.float32))
    by_version = registry.load(f"models:/{params.experiment}/2", url)
    assert json.loads((by_version / "registered.json").read_text())["version"] == "2"

    # everything went over HTTP to the server's store and its served artifacts, nothing to local paths
    assert not decoy.exists() and list(client_cwd.iterdir()) == []
    served = {p.name for p in mlflow_server.artifacts.rglob("*") if p.is_file()}
    assert {"fine_tuned.pt", "workflow.json", "MLmodel"} <= served
    # compose's clients reach the server as mlflow:5000: that Host header is accepted
    status, body = _http(f"{url}/api/2.0/mlflow/registered-models/get?name={params.experiment}", host="mlflow:5000")
    assert status == 200 and json.loads(body)["registered_model"]["aliases"][0]["version"] == "1", body
