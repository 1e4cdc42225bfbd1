"""The MLflow Model Registry: a run's fine-tuned model, registered under the experiment's name.

* :func:`log_model` logs the model of a run (or of a sweep's trial) as an MLflow **pyfunc** model
  into that run's MLflow run, with a signature and an input example. The model is self-contained:
  its one artifact, ``package/``, is laid out like a run's ``model/`` folder, plus everything needed
  to use it on new data offline::

      package/
        fine_tuned.pt  labels.json  model_info.json  [history.json]    the run's model/ folder
        workflow.json        model name, tokenizer settings, training params, label key, validation metrics
        base/.cache/helical/models/geneformer/<version>/               a helical model cache (cache_dir: base)
          gene_median_dictionary.pkl  token_dictionary.pkl  ensembl_mapping_dict.pkl
          <model name>/  config.json  model.safetensors | pytorch_model.bin  training_args.bin

  ``base/`` is what :func:`helical_workflow.model.load_fine_tuning_model` rebuilds the architecture
  from, so a registered model loads through exactly the code that loads a run's model
  (:func:`helical_workflow.modeling.load_model_dir`).
* :func:`register` makes it a new version of the registered model ``params.registered_model`` and moves the
  alias ``champion`` to it when it beats the current champion on a validation metric.
* :func:`load` downloads a registered model (``models:/<name>@<alias>``, ``models:/<name>/<version>``)
  into a local ``package/`` folder; :func:`open_package` loads it (:class:`PackagedModel`: logits and
  cell embeddings for token ids) and :func:`package_params` gives the params that tokenize new data
  for it (``model.model_paths(package_params(folder))`` names its dictionaries).

Nothing here is sqlite-specific: the tracking URI may be the embedded SQLite store or an MLflow server.
MLflow, torch and helical are imported inside the functions that use them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from . import files, modeling, runs
from . import model as model_mod

if TYPE_CHECKING:
    from .params import Params

PACKAGE = "package"  # the pyfunc model's artifact (and the folder :func:`load` returns)
BASE = "base"  # inside the package: the prefix of a helical model cache (``model.cache_dir``)
WORKFLOW = "workflow.json"
REGISTERED = "registered.json"  # written by :func:`load`: where the package came from
MODEL_INFO = "model_info.json"
MODEL_FILES = (modeling.WEIGHTS, modeling.LABELS, MODEL_INFO)
OPTIONAL_MODEL_FILES = ("history.json",)
CHAMPION = "champion"
FORMAT = 1  # of the package layout and workflow.json

Promote = Literal["always", "if_better", "never"]


class RegistryError(LookupError):
    """A registered model, version or alias that does not exist (the message says how to fix it)."""


# ------------------------------------------------------------------ the package ---


def _model_files_rel(params: "Params") -> dict[str, Path]:
    """The model files of ``params`` relative to the root of their helical cache."""
    root = model_mod.cache_root(params.model_cache_prefix)
    p = model_mod.model_paths(params)
    return {
        "version_dir": p["version_dir"].relative_to(root),
        "model_files_dir": p["model_files_dir"].relative_to(root),
    }


def workflow_info(params: "Params", labels: dict[str, int], validation: dict[str, Any]) -> dict[str, Any]:
    """``workflow.json``: what a user of the model needs to prepare new data and judge the model."""
    spec = params.model.spec
    rel = _model_files_rel(params)
    cache = Path(BASE) / model_mod.cache_root(Path("."))
    return {
        "format": FORMAT,
        "experiment": params.experiment,
        "model_name": params.model.name,
        "model": params.model.model_dump(mode="json", exclude={"cache_dir"}),
        "model_spec": {  # what tokenization must match
            "version": spec["version"],
            "input_size": spec["input_size"],
            "special_token": spec["special_token"],
            "embsize": spec["embsize"],
        },
        "tokenize": params.tokenize.model_dump(mode="json"),
        "fine_tune": params.fine_tune.model_dump(mode="json"),
        "data": params.data.model_dump(mode="json", exclude={"path"}),
        "label_key": params.data.label_key,
        "labels": [n for n, _ in sorted(labels.items(), key=lambda kv: kv[1])],
        "validation": dict(validation or {}),
        "files": {
            "weights": modeling.WEIGHTS,
            "labels": modeling.LABELS,
            "model_info": MODEL_INFO,
            "base_model_dir": str(cache / rel["model_files_dir"]),
            **{name.removesuffix(".pkl"): str(cache / rel["version_dir"] / name) for name in model_mod.DICTIONARIES},
        },
        "versions": runs.package_versions(),
    }


def build_package(params: "Params", model_dir: Path, dest: Path, *, validation: dict[str, Any]) -> Path:
    """Lay out ``dest`` (see the module docstring) from a run's ``model/`` folder and the model files of
    ``params``. No MLflow: this is what :func:`log_model` logs."""
    model_dir, dest = Path(model_dir), Path(dest)
    missing = [n for n in MODEL_FILES if not (model_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{model_dir} lacks {', '.join(missing)}: not a fine-tuned model folder. "
            "Fix: point at the model/ folder of a run (or trial) whose fine_tune stage completed."
        )
    absent = model_mod.missing_files(params)
    if absent:
        raise model_mod.ModelFilesMissing(
            "the base model files are missing: "
            + ", ".join(map(str, absent))
            + ". Fix: use the params the model was trained with (model.cache_dir, model.name)."
        )
    dest.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES + OPTIONAL_MODEL_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, dest / name)
    paths, rel = model_mod.model_paths(params), _model_files_rel(params)
    cache = model_mod.cache_root(dest / BASE)
    (cache / rel["version_dir"]).mkdir(parents=True, exist_ok=True)
    for name in model_mod.DICTIONARIES:
        shutil.copy2(paths["version_dir"] / name, cache / rel["version_dir"] / name)
    shutil.copytree(paths["model_files_dir"], cache / rel["model_files_dir"], dirs_exist_ok=True)
    labels = json.loads((model_dir / modeling.LABELS).read_text())
    (dest / WORKFLOW).write_text(json.dumps(workflow_info(params, labels, validation), indent=2))
    return dest


def package_params(folder: Path, data_path: str | os.PathLike | None = None) -> "Params":
    """Params for a package folder: its model files (``model.cache_dir`` is ``folder/base``), tokenizer
    settings and label key; ``data.path`` is ``data_path`` (new data to annotate) when given."""
    from .params import Params, Profile

    folder = Path(folder).resolve()
    wf = read_workflow(folder)
    raw = {
        "experiment": wf["experiment"],
        # without data_path, data.path is only a placeholder: nothing reads it
        "data": {**wf["data"], "path": str(data_path) if data_path is not None else str(folder / WORKFLOW)},
        "model": {**wf["model"], "cache_dir": str(folder / BASE)},
        "tokenize": wf["tokenize"],
        "fine_tune": wf["fine_tune"],
    }
    params = Params.model_validate(raw)
    return params.model_copy(update={"project_root": str(folder), "profiles": {"cpu": Profile()}})


def read_workflow(folder: Path) -> dict[str, Any]:
    path = Path(folder) / WORKFLOW
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: {folder} is not a registered-model package. "
            "Fix: pass the folder that registry.load returned (it holds workflow.json and fine_tuned.pt)."
        )
    return json.loads(path.read_text())


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class PackagedModel:
    """A registered model's package, loaded: logits and cell embeddings for cells given as token ids."""

    folder: Path
    params: "Params"
    model: Any  # helical's GeneformerFineTuningModel with the fine-tuned weights
    labels: dict[str, int]
    workflow: dict[str, Any]
    device: str
    precision: str
    batch_size: int

    @property
    def names(self) -> list[str]:
        """Label names in logit-column order."""
        return [n for n, _ in sorted(self.labels.items(), key=lambda kv: kv[1])]

    def predict(self, input_ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Logits and cell embeddings (in input order) for cells tokenized as the model was trained
        (``workflow["tokenize"]``, ``workflow["model_spec"]``), through :func:`modeling.predict`."""
        store = token_store(input_ids)
        empty = np.nonzero(store.lengths == 0)[0]
        if empty.size:
            raise ValueError(f"cells {empty[:10].tolist()} have no tokens. Fix: leave out cells with no tokens.")
        limit = self.workflow["model_spec"]["input_size"]
        long = np.nonzero(store.lengths > limit)[0]
        if long.size:
            raise ValueError(
                f"cells {long[:10].tolist()} have more than the model's {limit} input tokens. "
                "Fix: tokenize with the model's settings (they truncate to the input size)."
            )
        return modeling.predict(
            self.model,
            store,
            np.arange(len(store)),
            batch_size=self.batch_size,
            device=self.device,
            precision=self.precision,
            pad_id=self.model.pad_token_id,
        )


def token_store(input_ids: Sequence[Sequence[int]]) -> modeling.TokenStore:
    """A :class:`modeling.TokenStore` over token-id lists held in memory."""
    import datasets

    rows = [np.asarray(x, dtype=np.int64) for x in input_ids]
    return modeling.TokenStore(datasets.Dataset.from_dict({"input_ids": rows}))


def open_package(
    folder: Path, *, device: str = "cpu", batch_size: int | None = None, precision: str = "fp32"
) -> PackagedModel:
    """Load a package folder (from :func:`load` or :func:`build_package`) through :func:`modeling.load_model_dir`.

    ``device``: ``cpu``, ``cuda[:N]`` or ``auto`` (a GPU when one is visible); ``precision``: fp32, bf16, fp16.
    """
    folder = Path(folder).resolve()
    params = package_params(folder)
    bs = batch_size or modeling.batch_size(params, "evaluate")
    dev = _resolve_device(device)
    model, labels = modeling.load_model_dir(params, folder, batch_size=bs, device=dev)
    return PackagedModel(folder, params, model, labels, read_workflow(folder), dev, precision, bs)


def predict_logits(folder: Path, input_ids: Sequence[Sequence[int]], **kw: Any) -> np.ndarray:
    """Logits for token-id lists from a package folder (``kw``: see :func:`open_package`)."""
    return open_package(folder, **kw).predict(input_ids)[0]


# ------------------------------------------------------------------ pyfunc --------


_PYFUNC_CLASS: type | None = None


def _pyfunc_class() -> type:
    """The pyfunc model class, made on first use so that importing this module does not import MLflow.

    It is reachable as ``registry.GeneformerClassifier`` (module ``__getattr__``): the logged model's code
    (``pyfunc_model.py``) makes one, so a logged model loads with the installed library.
    """
    global _PYFUNC_CLASS
    if _PYFUNC_CLASS is not None:
        return _PYFUNC_CLASS
    import mlflow.pyfunc
    import pandas as pd

    class GeneformerClassifier(mlflow.pyfunc.PythonModel):
        """Cells as token-id lists (a DataFrame column ``input_ids``) in, logits (cells x labels) out.

        ``model_config``: ``device`` (cpu, cuda, auto), ``batch_size``, ``precision`` (fp32, bf16, fp16).
        """

        def load_context(self, context):
            cfg = dict(context.model_config or {})
            self.packaged = open_package(
                Path(context.artifacts[PACKAGE]),
                device=cfg.get("device") or "cpu",
                batch_size=cfg.get("batch_size"),
                precision=cfg.get("precision") or "fp32",
            )

        def predict(self, context, model_input, params=None):
            table = hasattr(model_input, "columns") or isinstance(model_input, dict)
            ids = list(model_input["input_ids"]) if table else list(model_input)
            return self.packaged.predict(ids)[0].astype(np.float32)

        # a DataFrame: the logged signature validates the input (MLflow infers nothing from this hint)
        predict.__annotations__ = {"model_input": pd.DataFrame}

    GeneformerClassifier.__module__ = __name__
    GeneformerClassifier.__qualname__ = "GeneformerClassifier"
    _PYFUNC_CLASS = GeneformerClassifier
    return _PYFUNC_CLASS


def __getattr__(name: str) -> Any:
    if name == "GeneformerClassifier":
        return _pyfunc_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def example_input_ids(params: "Params", n_cells: int = 2, n_genes: int = 16) -> list[list[int]]:
    """A small input example: cells of the first gene tokens of the model's dictionary (with <cls>/<eos>
    when the model has special tokens), shaped like the tokenizer's output."""
    import pickle

    with open(model_mod.model_paths(params)["token_path"], "rb") as f:
        vocab = pickle.load(f)
    genes = sorted(i for t, i in vocab.items() if not str(t).startswith("<"))
    special = params.model.spec["special_token"]
    cells = []
    for k in range(n_cells):
        row = [int(g) for g in genes[k : k + n_genes]]
        cells.append(([vocab["<cls>"]] + row + [vocab["<eos>"]]) if special else row)
    return cells


def _signature(n_classes: int):
    from mlflow.models import ModelSignature
    from mlflow.types import DataType
    from mlflow.types.schema import Array, ColSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([ColSpec(Array(DataType.long), "input_ids")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n_classes), "logits")]),
    )


def _pip_requirements() -> list[str]:
    """The kernel environment's pinned packages (this library itself is not on PyPI: it comes with the image)."""
    return [f"{n}=={v}" for n, v in runs.package_versions().items() if n != "helical-workflow"]


def _conda_env() -> dict[str, Any]:
    """The model's environment, stated in full (MLflow would otherwise look for a pip version in the kernel
    environment, which uv made without pip, and print a note about it)."""
    import platform

    return {
        "name": "helical-workflow",
        "channels": ["conda-forge"],
        "dependencies": [f"python={platform.python_version()}", "pip", {"pip": _pip_requirements()}],
    }


@contextlib.contextmanager
def _tracking_at(uri: str) -> Iterator[Any]:
    """MLflow's fluent API pointed at ``uri`` for the block, for tracking and for the model registry (a
    ``models:/`` download resolves through the registry URI, which ``MLFLOW_REGISTRY_URI`` would otherwise
    name); then as it was, environment included. Yields a client for the tracking store and its registry."""
    import mlflow
    from mlflow.tracking import _model_registry, _tracking_service

    if uri.startswith("sqlite:///"):  # the embedded store's folder (the server makes its own)
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    old_uri = getattr(_tracking_service.utils, "_tracking_uri", None)
    old_registry = getattr(_model_registry.utils, "_registry_uri", None)
    old_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    finally:
        mlflow.set_tracking_uri(old_uri)
        mlflow.set_registry_uri(old_registry)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def log_model(
    params: "Params",
    model_dir: Path,
    *,
    mlflow_run_id: str,
    tracking_uri: str,
    validation: dict[str, Any],
    input_example: Sequence[Sequence[int]] | None = None,
    card: str | None = None,
) -> str:
    """Log the fine-tuned model in ``model_dir`` (a run's or a trial's ``model/``) as a pyfunc model of the
    MLflow run ``mlflow_run_id``; returns its model URI (``models:/<model id>``), for :func:`register`.

    ``validation``: the validation metrics the model was selected on (``model_info.json["validation"]``).
    The run's status is left as it was. ``card``: the model card (Markdown), an artifact of the model
    (``model_card.md``, beside the package).
    """
    import mlflow
    import pandas as pd

    labels = json.loads((Path(model_dir) / modeling.LABELS).read_text())
    example = input_example if input_example is not None else example_input_ids(params)
    tags = {f"validation.{k}": str(v) for k, v in (validation or {}).items()}
    with tempfile.TemporaryDirectory(prefix="helical-model-") as tmp, _tracking_at(tracking_uri) as client:
        pkg = build_package(params, model_dir, Path(tmp) / PACKAGE, validation=validation)
        artifacts = {PACKAGE: str(pkg)}
        if card:
            (Path(tmp) / "model_card.md").write_text(card)
            artifacts["model_card"] = str(Path(tmp) / "model_card.md")
        status = client.get_run(mlflow_run_id).info.status
        active = mlflow.active_run()
        ctx = contextlib.nullcontext() if active and active.info.run_id == mlflow_run_id else None
        try:
            with ctx or mlflow.start_run(run_id=mlflow_run_id):
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(Path(__file__).with_name("pyfunc_model.py")),  # code, not a pickled object
                    artifacts=artifacts,
                    signature=_signature(len(labels)),
                    input_example=pd.DataFrame({"input_ids": [list(map(int, x)) for x in example]}),
                    conda_env=_conda_env(),
                    model_config={
                        "device": "cpu",
                        "batch_size": modeling.batch_size(params, "evaluate"),
                        "precision": "fp32",
                    },
                    metadata={"workflow": read_workflow(pkg)},
                    tags=tags,
                )
        finally:
            if ctx is None:  # resuming the run marked it RUNNING and then FINISHED: put its status back
                client.update_run(mlflow_run_id, status=status)
    return info.model_uri


# ------------------------------------------------------------------ registry ------


def _is_missing(e: Exception) -> bool:
    code = getattr(e, "error_code", "")
    return code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def _champion(client, name: str, metric: str) -> tuple[str | None, float | None]:
    """(version, metric value) of the version holding alias ``champion``; (None, None) when none does.

    Read from the registered model's aliases: stores differ in the error a missing alias raises."""
    version = client.get_registered_model(name).aliases.get(CHAMPION)
    if version is None:
        return None, None
    raw = client.get_model_version(name, str(version)).tags.get(metric)
    return str(version), (float(raw) if raw not in (None, "") else None)


def _fmt(a: float, b: float | None = None) -> tuple[str, str]:
    """Two values with enough digits to tell them apart (3 decimals unless that hides a difference)."""
    if b is None or math.isnan(b):
        return f"{a:.3f}", str(b)
    fa, fb = f"{a:.3f}", f"{b:.3f}"
    if fa == fb and a != b:
        fa, fb = repr(a), repr(b)
    return fa, fb


def _decide(promote: str, value: float, new: str, old: str | None, old_value: float | None) -> tuple[bool, str]:
    if promote == "never":
        who = f"champion stays v{old}" if old else "there is no champion"
        return False, f"promote='never': v{new} registered, {who}"
    if old is None:
        return True, f"no champion yet: v{new} becomes champion ({_fmt(value)[0]})"
    if promote == "always":
        if old_value is None:
            return True, f"promote='always': champion moves from v{old} to v{new}"
        a, b = _fmt(value, old_value)
        return True, f"promote='always': champion moves from v{old} ({b}) to v{new} ({a})"
    if old_value is None:
        return False, (
            f"champion v{old} has no value for this metric, so v{new} cannot be compared with it. "
            "Fix: register with promote='always' to replace it"
        )
    if not math.isfinite(value):
        return False, f"v{new}'s value {value} is not a number: champion stays v{old}"
    a, b = _fmt(value, old_value)
    if value > old_value:
        return True, f"{a} > {b}: champion moves from v{old} to v{new}"
    return False, f"not better than champion v{old} ({b} >= {a})"


def register(
    params: "Params",
    *,
    model_uri: str,
    metric: str,
    value: float,
    promote: Promote = "if_better",
    tracking_uri: str,
    description: str | None = None,
) -> dict[str, Any]:
    """A new version of the registered model ``params.registered_model`` (``registry.name``, else the experiment;
    created if needed) from ``model_uri``
    (what :func:`log_model` returned), with ``metric``'s ``value`` as a version tag; the alias ``champion``
    moves to it when ``promote`` is ``always``, or ``if_better`` and ``value`` is strictly greater than the
    champion's (or there is no champion yet); never with ``never``. Returns the decision::

        {"name", "version", "metric", "value", "champion_version_before", "champion_value_before",
         "promoted", "reason"}
    """
    from mlflow.exceptions import MlflowException

    if promote not in ("always", "if_better", "never"):
        raise ValueError(f"promote must be 'always', 'if_better' or 'never' (got {promote!r})")
    name, value = params.registered_model, float(value)
    with _tracking_at(tracking_uri) as client:
        try:
            client.create_registered_model(
                name,
                description=f"Geneformer cell-type classifiers of experiment '{params.experiment}' (helical-workflow)",
            )
        except MlflowException as e:
            if getattr(e, "error_code", "") not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        model_id = run_id = None
        rest = model_uri.removeprefix("models:/")
        if model_uri.startswith("models:/") and "/" not in rest and "@" not in rest:
            model_id = rest
            with contextlib.suppress(MlflowException):
                run_id = client.get_logged_model(model_id).source_run_id
        old, old_value = _champion(client, name, metric)
        mv = client.create_model_version(
            name,
            source=model_uri,
            run_id=run_id,
            tags={"metric": metric, metric: repr(value)},
            model_id=model_id,
            description=description,  # the model card's summary
        )
        new = str(mv.version)
        promoted, reason = _decide(promote, value, new, old, old_value)
        if promoted:
            client.set_registered_model_alias(name, CHAMPION, new)
        client.set_model_version_tag(name, new, "champion_decision", reason)
    return {
        "name": name,
        "version": new,
        "metric": metric,
        "value": value,
        "champion_version_before": old,
        "champion_value_before": old_value,
        "promoted": promoted,
        "reason": reason,
    }


def parse_model_ref(model_ref: str) -> tuple[str, str | None, str | None]:
    """``models:/<name>@<alias>`` -> (name, None, alias); ``models:/<name>/<version>`` -> (name, version, None);
    ``models:/<name>/latest`` -> (name, "latest", None)."""
    rest = model_ref.removeprefix("models:/") if model_ref.startswith("models:/") else None
    if rest:
        if "/" in rest:
            name, _, version = rest.partition("/")
            if name and (version.isdigit() or version == "latest"):
                return name, version, None
        elif "@" in rest:
            name, _, alias = rest.rpartition("@")
            if name and alias:
                return name, None, alias
    raise ValueError(
        f"{model_ref!r} is not a registered-model reference. "
        "Fix: give models:/<name>@<alias> (e.g. models:/demo@champion) or models:/<name>/<version>."
    )


def _resolve(client, model_ref: str):
    """The ModelVersion a reference names, or a RegistryError that says what to do."""
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_model_ref(model_ref)
    try:
        registered = client.get_registered_model(name)
    except MlflowException as e:
        if not _is_missing(e):
            raise
        raise RegistryError(
            f"no model registered under '{name}'. Fix: run a training DAG (or registry.register) for "
            f"experiment '{name}' first."
        ) from None
    if alias and alias not in registered.aliases:
        raise RegistryError(
            f"no model registered under '{name}' with alias '{alias}'. "
            f"Fix: run a training DAG first or give models:/{name}/<version>."
        )
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        if version == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise RegistryError(f"no versions registered under '{name}'. Fix: register a model first.")
            return max(versions, key=lambda v: int(v.version))
        return client.get_model_version(name, version)
    except MlflowException as e:
        if not _is_missing(e):
            raise
        what = f"with alias '{alias}'" if alias else f"version {version}"
        raise RegistryError(
            f"no model registered under '{name}' {what}. "
            f"Fix: run a training DAG first or give models:/{name}/<version>."
        ) from None


def resolve(model_ref: str, tracking_uri: str):
    """The MLflow ModelVersion that ``model_ref`` names now (an alias resolved), or a RegistryError with the fix."""
    with _tracking_at(tracking_uri) as client:
        return _resolve(client, model_ref)


def load(model_ref: str, tracking_uri: str, dest: Path | None = None) -> Path:
    """Download a registered model into ``dest`` (default: a new temporary folder) and return ``dest``:
    the package (see the module docstring), plus ``registered.json`` saying which version it is.

    ``dest`` is written atomically (replaced if it exists). Load it with :func:`open_package`.
    """
    import mlflow

    with _tracking_at(tracking_uri) as client:
        mv = _resolve(client, model_ref)
        name, version = mv.name, str(mv.version)
        if dest is None:
            dest = Path(tempfile.mkdtemp(prefix=f"helical-model-{name}-v{version}-")) / PACKAGE
        dest = Path(dest).resolve()
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.download-") as tmp:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tmp))
            pkg = local / "artifacts" / PACKAGE
            if not (pkg / WORKFLOW).is_file():
                raise RegistryError(
                    f"models:/{name}/{version} has no {PACKAGE}/{WORKFLOW}: it was not logged by "
                    "helical_workflow.registry.log_model. Fix: register a model logged by log_model."
                )
            record = {
                "model_ref": model_ref,
                "name": name,
                "version": version,
                "aliases": list(getattr(mv, "aliases", []) or []),
                "source": mv.source,
                "run_id": mv.run_id,
                "tags": dict(mv.tags or {}),
                "tracking_uri": tracking_uri,
                "downloaded": files.now_iso(),
            }
            (pkg / REGISTERED).write_text(json.dumps(record, indent=2))
            card = local / "artifacts" / "model_card.md"  # what the model was trained on, how well it does
            if card.is_file():
                shutil.copyfile(card, pkg / card.name)
            with files.atomic(dest, directory=True) as out:
                out.rmdir()
                os.replace(pkg, out)
    return dest
