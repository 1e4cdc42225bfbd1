"""The experiment parameters: one typed schema, one source of truth.

A params file (``params/<experiment>.yaml``) has one section per stage plus the
resource profile, tracking and (optionally) the Airflow schedule. Loading it
validates every field; an invalid file raises :class:`ParamsError` whose message
lists each problem as ``field: what is wrong (got VALUE). Fix: ...``.

This module is light on purpose (pydantic + PyYAML only): DAG files and the
Airflow worker import it.
"""

from __future__ import annotations

import difflib
import itertools
import math
import os
from collections.abc import Mapping
from datetime import date
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import stages

# Geneformer models known to helical 2.2.0 (mirrors helical's GeneformerConfig.model_map,
# kept here so that validation does not import helical or torch).
GENEFORMER_MODELS: dict[str, dict[str, Any]] = {
    "gf-6L-10M-i2048": {"input_size": 2048, "special_token": False, "embsize": 256, "version": "v1"},
    "gf-12L-40M-i2048": {"input_size": 2048, "special_token": False, "embsize": 512, "version": "v1"},
    "gf-12L-40M-i2048-CZI-CellxGene": {"input_size": 2048, "special_token": False, "embsize": 512, "version": "v1"},
    "gf-12L-38M-i4096": {"input_size": 4096, "special_token": True, "embsize": 512, "version": "v2"},
    "gf-12L-38M-i4096-CLcancer": {"input_size": 4096, "special_token": True, "embsize": 512, "version": "v2"},
    "gf-20L-151M-i4096": {"input_size": 4096, "special_token": True, "embsize": 896, "version": "v2"},
    "gf-12L-104M-i4096": {"input_size": 4096, "special_token": True, "embsize": 768, "version": "v3"},
    "gf-12L-104M-i4096-CLcancer": {"input_size": 4096, "special_token": True, "embsize": 768, "version": "v3"},
    "gf-18L-316M-i4096": {"input_size": 4096, "special_token": True, "embsize": 1152, "version": "v3"},
}

OUTPUTS_ENV = "HELICAL_WORKFLOW_OUTPUTS"
PUSHGATEWAY_ENV = "HELICAL_PUSHGATEWAY"


class ParamsError(ValueError):
    """An invalid params or profiles file. The message names every problem and its fix."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.path = str(path)
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{self.path} is invalid ({len(problems)} problem(s)):\n{lines}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitParams(_Strict):
    train: float = Field(0.7, gt=0, lt=1)
    validation: float = Field(0.15, ge=0, lt=1)
    test: float = Field(0.15, gt=0, lt=1)
    seed: int = 0
    stratify: bool = True
    group_by: str | None = Field(
        None,
        min_length=1,
        description="adata.obs column (e.g. donor, sample or batch) whose groups each go to exactly one split, "
        "so that no group leaks between train, validation and test; default: split cells independently",
    )

    @model_validator(mode="after")
    def _sum_to_one(self) -> "SplitParams":
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"train + validation + test must add up to 1 (they add up to {total:g}); adjust the fractions"
            )
        return self


class DataParams(_Strict):
    path: str = Field(
        description="the .h5ad file; a relative path resolves from the folder above params/ (the project root), "
        "or from the params file's own folder when it is not in a params/ folder"
    )
    label_key: str = Field(description="adata.obs column holding the cell-type label")
    gene_names: str = Field("index", description="adata.var column with gene names, or 'index'")
    gene_id_type: Literal["symbol", "ensembl"] = "symbol"
    counts: str = Field("X", description="where raw counts live: X, raw, or layer:<name>")
    split: SplitParams = SplitParams()
    min_cells_per_class: int = Field(2, ge=1)
    chunk_size: int = Field(2048, ge=1)

    @field_validator("counts")
    @classmethod
    def _counts_source(cls, v: str) -> str:
        if v in ("X", "raw") or (v.startswith("layer:") and len(v) > len("layer:")):
            return v
        raise ValueError("must be 'X', 'raw' or 'layer:<name>'")


class ModelParams(_Strict):
    name: str = "gf-6L-10M-i2048"
    source: Literal["helical", "local_tiny"] = Field(
        "helical",
        description="helical: files from helical's model cache (downloaded once with network); "
        "local_tiny: a small Geneformer-shaped model and dictionaries built from the dataset",
    )
    cache_dir: str | None = Field(
        None, description="prefix of the helical model cache (like CACHE_DIR_HELICAL_PREFIX); default ~"
    )
    tiny_layers: int = Field(2, ge=1)
    tiny_heads: int = Field(4, ge=1)
    tiny_intermediate_size: int = Field(512, ge=8)
    seed: int = 0

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str) -> str:
        if v not in GENEFORMER_MODELS:
            close = difflib.get_close_matches(v, GENEFORMER_MODELS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown Geneformer model; known: {', '.join(GENEFORMER_MODELS)}.{hint}")
        return v

    @property
    def spec(self) -> dict[str, Any]:
        return GENEFORMER_MODELS[self.name]


class TokenizeParams(_Strict):
    implementation: Literal["streaming", "helical"] = Field(
        "streaming", description="streaming: backed-mode, sharded, token-identical to helical; helical: the reference"
    )
    shards: int = Field(1, ge=1, le=1024, description="row shards, one Airflow task each")
    workers: int | None = Field(None, ge=1, description="processes within one shard; default: the profile's cpus")
    chunk_size: int = Field(2048, ge=1)


class FineTuneParams(_Strict):
    implementation: Literal["batched", "helical"] = Field(
        "batched", description="batched: our AMP loop around helical's model; helical: GeneformerFineTuningModel.train"
    )
    epochs: int = Field(1, ge=1, description="passes over the training split")
    batch_size: int | None = Field(None, ge=1, description="default: the profile's batch_size")
    learning_rate: float = Field(1e-4, gt=0, description="peak AdamW learning rate (after warmup)")
    weight_decay: float = Field(0.01, ge=0)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    gradient_accumulation: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    freeze_layers: int = Field(0, ge=0, description="encoder layers kept frozen, counted from the input")
    encoder_dropout: bool = Field(
        False,
        description="true: dropout in the encoder while training; false (default): encoder in eval mode, as "
        "helical's train runs it (results comparable to helical, about 2x faster on CPU)",
    )
    class_weights: bool = Field(False, description="weight the loss by inverse class frequency")
    early_stopping_patience: int | None = Field(None, ge=1, description="epochs without a better validation macro-F1")
    shuffle: bool = True
    group_by_length: bool = True
    checkpoint_every_steps: int | None = Field(None, ge=1, description="besides every epoch")
    log_every_steps: int = Field(10, ge=1)
    processes: int | None = Field(None, ge=1, description="data-parallel processes; default: the profile's gpus (or 1)")


class EvaluateParams(_Strict):
    batch_size: int | None = Field(None, ge=1)
    umap: bool = True
    ci_resamples: int = Field(
        1000,
        ge=0,
        description="bootstrap resamples of the test cells (of whole groups when the split is grouped) for the 95 % "
        "intervals of accuracy, macro-F1 and each class's F1, for the model and every baseline; 0: none",
    )


class SweepParams(_Strict):
    """Trials over fine_tune fields, after one shared load + tokenize (the DAG maps fine_tune -> evaluate)."""

    method: Literal["grid", "random", "lhs"] = Field(
        "grid", description="grid: every combination; random or lhs (Latin hypercube): `trials` samples of `space`"
    )
    grid: dict[str, list[Any]] = Field({}, description="method grid: field -> values, e.g. fine_tune.learning_rate")
    space: dict[str, list[float]] = Field({}, description="method random/lhs: field -> [low, high]")
    log_scale: list[str] = Field([], description="fields of `space` sampled on a log scale (learning rates)")
    trials: int | None = Field(None, ge=1, le=256, description="method random/lhs: how many trials")
    seed: int = 0
    metric: Literal["macro_f1", "accuracy"] = Field("macro_f1", description="validation metric to maximise")

    @model_validator(mode="after")
    def _complete(self) -> "SweepParams":
        if self.method == "grid":
            if not self.grid or any(not isinstance(v, list) or not v for v in self.grid.values()):
                raise ValueError("method grid needs `grid: {field: [values, ...]}` with at least one value per field")
        else:
            if not self.space or self.trials is None:
                raise ValueError(f"method {self.method} needs `space: {{field: [low, high]}}` and `trials: N`")
            for field, bounds in self.space.items():
                if len(bounds) != 2 or not bounds[0] < bounds[1]:
                    raise ValueError(f"space.{field} must be [low, high] with low < high")
            for field in self.log_scale:
                if field not in self.space or self.space[field][0] <= 0:
                    raise ValueError(f"log_scale field {field} needs a positive [low, high] in space")
        for field in [*self.grid, *self.space]:
            if not field.startswith("fine_tune."):
                raise ValueError(
                    f"{field}: only fine_tune fields vary across trials (load and tokenize run once for all of "
                    "them); sweep another model or dataset in a params file of its own"
                )
        return self

    # --- the trials (deterministic for a seed; numpy/scipy imported only to sample) ---------------------
    def count(self) -> int:
        if self.method == "grid":
            return math.prod(len(v) for v in self.grid.values())
        return int(self.trials or 1)

    def varied(self) -> list[str]:
        """The fields the trials vary."""
        return list(self.grid or self.space)

    def expand(self) -> list[dict[str, Any]]:
        """The overrides of each trial (``{"fine_tune.learning_rate": 3e-4, ...}``), trial 0 first.

        * ``grid``: every combination of the listed values, in the order the fields are written;
        * ``random``: ``trials`` independent draws from ``space`` (uniform, or log-uniform for ``log_scale``);
        * ``lhs``: a Latin hypercube of ``trials`` points over ``space`` (scipy's ``qmc``), which covers every
          range evenly with few trials.
        """
        if self.method == "grid":
            keys = list(self.grid)
            return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(self.grid[k] for k in keys))]
        keys = list(self.space)
        if self.method == "lhs":
            from scipy.stats import qmc

            unit = qmc.LatinHypercube(d=len(keys), seed=self.seed).random(self.trials)
        else:
            import numpy as np

            unit = np.random.default_rng(self.seed).random((self.trials, len(keys)))
        out = []
        for row in unit:
            trial = {}
            for key, u in zip(keys, row, strict=True):
                lo, hi = self.space[key]
                if key in self.log_scale:
                    value = math.exp(math.log(lo) + float(u) * (math.log(hi) - math.log(lo)))
                else:
                    value = lo + float(u) * (hi - lo)
                trial[key] = round(value) if _is_int_field(key) else float(f"{value:.4g}")
            out.append(trial)
        return out


def _is_int_field(dotted: str) -> bool:
    """Whether a fine_tune field is an integer (epochs, freeze_layers, ...): its samples are rounded."""
    ann = FineTuneParams.model_fields[dotted.split(".", 1)[1]].annotation
    return ann is int or int in getattr(ann, "__args__", ())


class RegistryParams(_Strict):
    promote: Literal["always", "if_better", "never"] = Field(
        "if_better", description="move alias `champion` to the new model: always, when it beats it, or never"
    )
    name: str | None = Field(None, description="registered model name; default: the experiment")


class AnnotateParams(_Strict):
    """``annotate:``: labelling new data with a fine-tuned model (the annotate command and DAG)."""

    inputs: list[str] = Field(
        default_factory=list,
        description="the .h5ad files an annotation run labels (set per run: the watched folder's new files, the "
        "Trigger form, or `helical-workflow annotate FILE`)",
    )
    force: bool = Field(False, description="annotate again content this model version already annotated")
    model: str | None = Field(
        None,
        description="models:/<name>@<alias>, models:/<name>/<version>, a run (or trial) folder, or a package "
        "folder; default: models:/<registry name>@champion",
    )
    min_confidence: float = Field(0.5, ge=0, le=1, description="cells whose top probability is lower are 'unassigned'")
    min_gene_coverage: float = Field(
        0.5, gt=0, le=1, description="refuse inputs whose genes are in the model's vocabulary less often than this"
    )
    shards: int = Field(1, ge=1, le=512, description="row-range shards of the inference (one mapped task each)")
    chunk_cells: int = Field(4096, ge=64, description="cells predicted (and held) at a time")
    batch_size: int | None = Field(None, ge=1, description="default: the profile's")
    gene_names: str | None = Field(None, description="var column with gene names; default: the model's training data's")
    gene_id_type: Literal["symbol", "ensembl"] | None = Field(None, description="default: the model's training data's")
    label_key: str | None = Field(
        None, description="obs column with known labels to score against; default: the model's label key, if present"
    )


class WatchParams(_Strict):
    """``watch:``: the folder whose new ``.h5ad`` files start annotation runs (an Airflow asset with a watcher)."""

    incoming: str = Field("data/incoming", description="watched folder (relative to the project)")
    stable_seconds: float = Field(5.0, ge=0, description="a file's size and mtime must hold this long before it runs")
    poll_seconds: float = Field(2.0, gt=0, description="how often the triggerer looks at the folder")


class TrackingParams(_Strict):
    mlflow_tracking_uri: str | None = Field(
        None, description="default: MLFLOW_TRACKING_URI, else a SQLite store under the outputs folder"
    )
    pushgateway: str | None = Field(None, description=f"host:port; default: ${PUSHGATEWAY_ENV}")


ON_NEW_DATA = "on_new_data"


class DagParams(_Strict):
    schedule: str | None = Field(
        None,
        description=f"a cron expression or preset (@daily), '{ON_NEW_DATA}' (a run whenever data.path's content "
        "changes: an Airflow asset with a watcher in the triggerer), or null (triggered by hand)",
    )
    start_date: date = date(2026, 1, 1)
    catchup: bool = False
    tags: list[str] = []
    max_active_runs: int = Field(1, ge=1)


class Profile(_Strict):
    device: Literal["cpu", "cuda"] = "cpu"
    gpus: int = Field(0, ge=0)
    gpu_type: str | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    memory: str = Field("8g", pattern=r"^\d+(\.\d+)?[kmgKMG]i?$|^\d+$")
    cpus: float = Field(2, gt=0)
    batch_size: int = Field(16, ge=1)
    launcher: Literal["local", "docker", "kubernetes"] = "local"
    retries: int = Field(0, ge=0)
    cell_timeout_s: int | None = Field(None, ge=1)
    pool: str | None = None
    queue: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$")  # CeleryExecutor: the workers serving it
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, str | int]] = []  # as in a pod spec: key, operator, value, effect, tolerationSeconds

    @model_validator(mode="after")
    def _gpu_consistent(self) -> "Profile":
        if self.device == "cuda" and self.gpus < 1:
            raise ValueError("device 'cuda' needs gpus >= 1; set gpus or use device: cpu")
        if self.device == "cpu" and self.precision == "fp16":
            raise ValueError("fp16 needs a GPU (device: cuda); use fp32 or bf16 on CPU")
        return self


class Params(_Strict):
    experiment: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    data: DataParams
    model: ModelParams = ModelParams()
    tokenize: TokenizeParams = TokenizeParams()
    fine_tune: FineTuneParams = FineTuneParams()
    evaluate: EvaluateParams = EvaluateParams()
    profile: str = "cpu"
    stage_profiles: dict[str, str] = Field({}, description="resource profile per stage name")
    tracking: TrackingParams = TrackingParams()
    outputs_dir: str = "outputs"
    dag: DagParams | None = None
    sweep: SweepParams | None = None
    registry: RegistryParams = RegistryParams()
    annotate: AnnotateParams = AnnotateParams()
    watch: WatchParams = WatchParams()
    seed: int | None = Field(
        None,
        description="one seed for everything random: the split (data.split.seed), the model's initialisation and "
        "training order (model.seed), a sweep's samples (sweep.seed) and evaluate's bootstrap; a section's own "
        "seed, when the file gives one, wins",
    )
    deterministic: bool = Field(
        False,
        description="torch's deterministic algorithms in fine_tune and evaluate (bit-identical GPU reruns; slower "
        "on GPU, no change on CPU, where runs are deterministic anyway)",
    )

    @field_validator("stage_profiles")
    @classmethod
    def _known_stages(cls, v: dict[str, str]) -> dict[str, str]:
        known = stages.names(None)
        for name in v:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ValueError(f"unknown stage {name!r}; stages: {', '.join(known)}.{hint}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _empty_sections_are_defaults(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            raw = {
                k: (
                    {}
                    if v is None
                    and k in ("model", "tokenize", "fine_tune", "evaluate", "tracking", "registry", "annotate", "watch")
                    else v
                )
                for k, v in raw.items()
            }
            if isinstance(raw.get("seed"), int):  # the one seed fills every section's seed the file leaves out
                seed = raw["seed"]
                data = dict(raw["data"]) if isinstance(raw.get("data"), dict) else raw.get("data")
                if isinstance(data, dict):
                    split = dict(data.get("split") or {})
                    split.setdefault("seed", seed)
                    raw["data"] = {**data, "split": split}
                if isinstance(raw.get("model", {}), dict):
                    raw["model"] = {"seed": seed, **(raw.get("model") or {})}
                if isinstance(raw.get("sweep"), dict):
                    raw["sweep"] = {"seed": seed, **raw["sweep"]}
        return raw

    # Filled in by load_params, not by the file.
    source_path: str = Field("", exclude=True)
    project_root: str = Field("", exclude=True)
    profiles: dict[str, Profile] = Field(default_factory=dict, exclude=True)
    overrides: dict[str, Any] = Field(default_factory=dict, exclude=True)  # what differs from the file

    # --- resolved paths -------------------------------------------------------
    def resolve(self, p: str | os.PathLike) -> Path:
        p = Path(os.path.expanduser(str(p)))
        return p if p.is_absolute() else (Path(self.project_root) / p)

    @property
    def data_path(self) -> Path:
        return self.resolve(self.data.path)

    @property
    def outputs_path(self) -> Path:
        override = os.environ.get(OUTPUTS_ENV)
        return Path(override).resolve() if override else self.resolve(self.outputs_dir)

    @property
    def registered_model(self) -> str:
        """The MLflow registered model the compare stage adds versions to (``registry.name``, else the experiment)."""
        return self.registry.name or self.experiment

    @property
    def champion_file(self) -> Path:
        """Where the compare stage notes the experiment's champion (what the DAG's docs show)."""
        return self.outputs_path / "champions" / f"{self.experiment}.json"

    @property
    def model_cache_prefix(self) -> Path:
        if self.model.cache_dir:
            return self.resolve(self.model.cache_dir)
        env = os.environ.get("CACHE_DIR_HELICAL_PREFIX")
        return Path(env) if env else Path.home()

    def profile_for(self, stage: str) -> Profile:
        return self.profiles[self.stage_profiles.get(stage, self.profile)]

    @property
    def pushgateway(self) -> str | None:
        return self.tracking.pushgateway or os.environ.get(PUSHGATEWAY_ENV) or None

    def snapshot(self) -> dict[str, Any]:
        """The parameters as they were resolved for a run (JSON-serialisable)."""
        d = self.model_dump(mode="json")
        d["data"]["path"] = str(self.data_path)
        d["resolved_profiles"] = {s: self.profile_for(s).model_dump(mode="json") for s in stages.names(None)}
        return d

    def resolved(self) -> dict[str, Any]:
        """The file's content with every path made absolute: valid wherever the file is written."""
        d = self.model_dump(mode="json")
        d["data"]["path"] = str(self.data_path)
        d["outputs_dir"] = str(self.outputs_path)
        if self.model.cache_dir:
            d["model"]["cache_dir"] = str(self.resolve(self.model.cache_dir))
        return d

    def payload(self) -> dict[str, Any]:
        """The params file's content (absolute paths), its profiles and the overrides: what :meth:`save` writes."""
        profiles = {k: p.model_dump(mode="json") for k, p in self.profiles.items()}
        return {"params": self.resolved(), "profiles": profiles, "overrides": dict(self.overrides)}

    def save(self, folder: Path) -> Path:
        """Write these params (absolute paths) and their profiles into ``folder``; returns the params file."""
        return write_payload(self.payload(), folder)


class ProfilesFile(_Strict):
    profiles: dict[str, Profile]


def _fmt_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(x) for x in loc) or "(top level)"


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names allowed at the parent of ``loc`` (for 'unknown key' hints)."""
    cur: Any = model
    for part in loc[:-1]:
        fields = getattr(cur, "model_fields", None)
        if not fields or part not in fields:
            return []
        ann = fields[part].annotation
        args = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        cur = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else (args[0] if args else None)
        if cur is None:
            return []
    fields = getattr(cur, "model_fields", {})
    return [k for k, f in fields.items() if not f.exclude]


def _explain(err: dict[str, Any], model: type[BaseModel]) -> str:
    loc = tuple(err["loc"])
    field = _fmt_loc(loc)
    value = err.get("input")
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, loc)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return f"{field}: unknown key. Fix: remove it; allowed keys here: {', '.join(allowed)}.{hint}"
    if kind == "missing":
        return f"{field}: required but missing. Fix: add it to the file."
    msg = err["msg"].removeprefix("Value error, ")
    shown = repr(value) if not isinstance(value, dict) else "a mapping"
    return f"{field}: {msg} (got {shown})."


def _validation_problems(exc: ValidationError, model: type[BaseModel]) -> list[str]:
    return [_explain(e, model) for e in exc.errors()]


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ParamsError(path, [f"file not found: {path}. Fix: pass an existing params file (see params/)."])
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ParamsError(path, [f"not valid YAML: {e}"]) from None


def load_profiles(path: Path) -> dict[str, Profile]:
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise ParamsError(path, ["expected a mapping with a 'profiles' key"])
    try:
        return dict(ProfilesFile.model_validate(raw).profiles)
    except ValidationError as e:
        raise ParamsError(path, _validation_problems(e, ProfilesFile)) from None


def data_file_problems(params: Params) -> list[str]:
    """Problems with the data file that need no heavy import (exists, is a readable .h5ad)."""
    dp = params.data_path
    if not dp.exists():
        hint = " (run `make data` for the bundled demo dataset)." if "pbmc68k" in dp.name else "."
        return [f"data.path: file not found: {dp}. Fix: point data.path at an existing .h5ad file{hint}"]
    if not dp.is_file():
        return [f"data.path: {dp} is not a file. Fix: point it at an .h5ad file."]
    if not os.access(dp, os.R_OK):
        return [f"data.path: {dp} is not readable. Fix: check its permissions."]
    if dp.suffix != ".h5ad":
        return [f"data.path: {dp.name} does not end in .h5ad. Fix: convert it with anndata (AnnData.write_h5ad)."]
    with open(dp, "rb") as f:
        if f.read(8) != b"\x89HDF\r\n\x1a\n":
            return [
                f"data.path: {dp} is not an HDF5/.h5ad file (bad signature; truncated or another format). "
                "Fix: re-export it with AnnData.write_h5ad."
            ]
    return []


def find_project_root(params_path: Path) -> Path:
    """The folder that holds ``params/``: relative paths in a params file resolve from it."""
    parent = params_path.resolve().parent
    return parent.parent if parent.name == "params" else parent


# The fields a researcher changes at trigger time: the Airflow Trigger form shows these.
TRIGGER_FIELDS = (
    "data.path",
    "data.label_key",
    "fine_tune.epochs",
    "fine_tune.learning_rate",
    "fine_tune.batch_size",
    "fine_tune.freeze_layers",
    "fine_tune.class_weights",
    "fine_tune.early_stopping_patience",
    "profile",
)
# The annotation DAG's Trigger form (helical_annotate): what to annotate, with which model.
ANNOTATE_TRIGGER_FIELDS = (
    "annotate.inputs",
    "annotate.model",
    "annotate.min_confidence",
    "annotate.force",
    "profile",
)


def flatten_overrides(conf: Mapping[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """``{"fine_tune": {"epochs": 2}}`` or ``{"fine_tune.epochs": 2}`` -> ``{"fine_tune.epochs": 2}``."""
    out: dict[str, Any] = {}
    for k, v in (conf or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v and key.split(".")[0] in Params.model_fields and _is_section(key):
            out.update(flatten_overrides(v, key + "."))
        else:
            out[key] = v
    return out


def _is_section(dotted: str) -> bool:
    """Whether ``dotted`` names a nested section of the schema (whose keys are fields), not a mapping field."""
    cur: Any = Params
    for part in dotted.split("."):
        fields = getattr(cur, "model_fields", None)
        if not fields or part not in fields:
            return False
        ann = fields[part].annotation
        subs = [a for a in (ann, *getattr(ann, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not subs:
            return False
        cur = subs[0]
    return True


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set fine_tune.epochs=2`` (YAML values) -> overrides."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ParamsError("--set", [f"{item!r} is not KEY=VALUE. Fix: e.g. --set fine_tune.epochs=2"])
        out[key.strip()] = yaml.safe_load(value)
    return out


def apply_overrides(params: Params, overrides: Mapping[str, Any] | None) -> Params:
    """``overrides`` (dotted keys, or nested sections) merged over the params, validated by the same schema.

    An unknown key or an invalid value raises :class:`ParamsError` naming the field and the fix, before any
    compute. The result records in ``overrides`` the values that differ from the file.
    """
    flat = flatten_overrides(overrides)
    if not flat:
        return params
    raw = params.model_dump(mode="json")
    problems: list[str] = []
    for dotted, value in flat.items():
        cur: Any = raw
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            if not isinstance(cur, dict) or (part not in cur and not _is_section(".".join(parts[: i + 1]))):
                allowed = sorted(cur) if isinstance(cur, dict) else []
                close = difflib.get_close_matches(part, allowed, n=1)
                hint = f" Did you mean '{'.'.join([*parts[:i], close[0]])}'?" if close else ""
                problems.append(
                    f"override {dotted}: unknown field. Fix: use a field of the params schema, "
                    f"e.g. {', '.join(TRIGGER_FIELDS[:3])}.{hint}"
                )
                break
            if i == len(parts) - 1:
                cur[part] = value
            else:
                cur = cur.setdefault(part, {}) if cur.get(part) is None else cur[part]
    if problems:
        raise ParamsError(_overrides_of(params), problems)
    try:
        merged = Params.model_validate(raw)
    except ValidationError as e:
        fixes = [
            f"override {p} Fix: change the override (or the params file)." for p in _validation_problems(e, Params)
        ]
        raise ParamsError(_overrides_of(params), fixes) from None
    changed = {k: v for k, v in flat.items() if _get(params, k) != _get(merged, k)}
    merged = merged.model_copy(
        update={
            "source_path": params.source_path,
            "project_root": params.project_root,
            "profiles": params.profiles,
            "overrides": {**params.overrides, **changed},
        }
    )
    problems = _profile_problems(merged) + (data_file_problems(merged) if "data.path" in changed else [])
    if problems:
        raise ParamsError(_overrides_of(params), [f"override {p}" for p in problems])
    return merged


def _overrides_of(params: Params) -> str:
    """What an invalid override is reported against: the run's overrides, not the (valid) file."""
    where = f" over {Path(params.source_path).name}" if params.source_path else ""
    return f"this run's overrides (Trigger form, conf or --set){where}"


def _get(params: Params, dotted: str) -> Any:
    cur: Any = params
    for part in dotted.split("."):
        cur = getattr(cur, part, None) if not isinstance(cur, dict) else cur.get(part)
    return cur.model_dump(mode="json") if isinstance(cur, BaseModel) else cur


def trigger_form(params: Params, fields: tuple[str, ...] = TRIGGER_FIELDS) -> dict[str, dict[str, Any]]:
    """JSON-schema specs (type, bounds, description, default from the file) for the Trigger form's fields."""
    schema = Params.model_json_schema()
    defs = schema.get("$defs", {})
    out: dict[str, dict[str, Any]] = {}
    for dotted in fields:
        node: dict[str, Any] = schema
        for part in dotted.split("."):
            node = node["properties"][part]
            if "$ref" in node:
                node = defs[node["$ref"].rsplit("/", 1)[-1]]
        spec = {
            k: v
            for k, v in node.items()
            if k
            in ("type", "items", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum", "description")
        }
        if "anyOf" in node:  # `int | None`: a nullable type with the bounds of its non-null branch
            branches = node["anyOf"]
            spec["type"] = [b.get("type", "null") for b in branches]
            for b in branches:
                spec.update({k: v for k, v in b.items() if k in ("minimum", "exclusiveMinimum", "maximum")})
        if dotted == "profile":
            spec["enum"] = sorted(params.profiles)
        spec.setdefault("description", "")
        spec["description"] = (spec["description"] + f" (file: {_get(params, dotted)!r})").strip()
        spec["default"] = _get(params, dotted)
        spec["title"] = dotted
        out[dotted] = spec
    return out


def write_payload(payload: dict[str, Any], folder: Path) -> Path:
    """Write a params payload as ``folder/<experiment>.yaml`` + ``folder/profiles.yaml`` (atomically)."""
    from .files import write_text

    folder = Path(folder)
    raw = payload["params"]
    path = folder / f"{raw['experiment']}.yaml"
    write_text(folder / "profiles.yaml", yaml.safe_dump({"profiles": payload["profiles"]}, sort_keys=False))
    write_text(path, yaml.safe_dump(raw, sort_keys=False))
    return path


def _trial_problems(params: Params) -> list[str]:
    """Every trial of a sweep is validated with the file: a bad value fails before any compute."""
    if params.sweep is None:
        return []
    problems: list[str] = []
    for k, overrides in enumerate(params.sweep.expand()):
        try:
            apply_overrides(params, overrides)
        except ParamsError as e:
            problems += [p.replace("override ", f"sweep trial {k}: ", 1) for p in e.problems]
    return problems


def _profile_problems(params: Params) -> list[str]:
    return _unknown_profiles(params.profile, params.stage_profiles, params.profiles)


def _unknown_profiles(profile: Any, stage_profiles: Any, profiles: Mapping[str, Any]) -> list[str]:
    named = [("profile", profile)] + [
        (f"stage_profiles.{s}", n) for s, n in (stage_profiles.items() if isinstance(stage_profiles, Mapping) else ())
    ]
    return [
        f"{field}: unknown resource profile {name!r}. Fix: use one of {', '.join(sorted(profiles))} "
        "(defined in profiles.yaml)."
        for field, name in named
        if isinstance(name, str) and name not in profiles
    ]


def load_params(path: str | os.PathLike, *, check_files: bool = True) -> Params:
    """Load and validate a params file (and the profiles file next to it).

    With ``check_files`` the data file must exist and be readable; that check needs no
    heavy imports. Checks that need to open the dataset (the label column, the counts
    source) run in :func:`helical_workflow.data.check_dataset`.
    """
    path = Path(path).resolve()
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise ParamsError(path, ["expected a mapping of sections (experiment, data, model, ...)"])
    root = find_project_root(path)
    profiles_path = path.parent / "profiles.yaml"
    profiles = load_profiles(profiles_path) if profiles_path.is_file() else {"cpu": Profile()}
    problems: list[str] = []
    try:
        params = Params.model_validate(raw)
    except ValidationError as e:  # every problem at once: the schema's, and the profiles' names
        more = _unknown_profiles(raw.get("profile", "cpu"), raw.get("stage_profiles") or {}, profiles)
        raise ParamsError(path, _validation_problems(e, Params) + more) from None
    params = params.model_copy(update={"source_path": str(path), "project_root": str(root), "profiles": profiles})
    problems += _profile_problems(params)
    problems += _trial_problems(params)
    if check_files:
        problems += data_file_problems(params)
    # deduplicate while keeping order
    problems = list(dict.fromkeys(problems))
    if problems:
        raise ParamsError(path, problems)
    return params
