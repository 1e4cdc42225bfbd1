"""Annotate any ``.h5ad`` with a fine-tuned model: cell types, confidence, embeddings, a report.

An annotation run (``helical-workflow annotate``, or a run of the ``helical_annotate`` DAG) is a run of the
stage engine (:mod:`helical_workflow.runs`), with the stages of :data:`helical_workflow.stages.ANNOTATE_STAGES`
(``annotate_prepare`` → ``annotate``, one task per row shard → ``annotate_finish``), each a notebook executed by
papermill through the launcher of its resource profile, in its run folder
``<outputs>/annotate/runs/<experiment>/<run id>/`` (``run.json``, pinned params with the run's
``annotate.inputs``, notebooks, reports, metrics, an MLflow run in ``<experiment>-annotate``).

The result of each input is one folder, keyed by the input's content hash and the model's version::

    <outputs>/annotate/<sha256[:12]>-<input stem>/<model key>/
      annotation.json          status, input, model, settings, gene coverage, timings, outputs
      tokenized/shard-*/       rank-value tokens (the model's own dictionaries and settings)
      shards/shard-*/          rows.npy, logits.npy, embeddings.npy of the cells with tokens
      predictions.parquet      cell id, predicted label (or 'unassigned'), confidence, top-3 labels
      embeddings.npy           cell embeddings, one row per input cell (NaN for cells without tokens)
      annotated.h5ad           the input, byte for byte, plus obs columns and obsm["X_geneformer"]
      annotate_report.ipynb / reports/annotate_report.html

The steps, which the command line runs in a row and the ``helical_annotate`` DAG runs as tasks:

1. :func:`prepare`: open the input (clear errors for a broken file), hash it, resolve the model
   (``models:/<name>@<alias>``, ``models:/<name>/<version>``, a run or trial folder, or a package
   folder), check gene coverage against the model's vocabulary (refused below
   ``annotate.min_gene_coverage``). Returns ``None`` when this file was already annotated by this model.
2. :func:`annotate_shard` (one per row-range shard): tokenize, then length-grouped batched inference
   without gradients, under the profile's autocast, ``chunk_cells`` cells at a time into ``.npy`` files.
3. :func:`merge`: the shards into the three outputs, streamed; then :func:`finish` marks success.

Memory is flat in the number of cells: tokens, logits and embeddings live in files, logits and embeddings
written and read a block of rows at a time (never mapped whole, so that their pages do not add up in the
process's RSS), predictions are written by row groups, and ``X`` is never decoded (the input file is
copied and the new columns are added to the copy with h5py).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import data as data_mod
from . import files, runs, stages
from .stages import Shard

if TYPE_CHECKING:
    from .params import Params
    from .runs import Run

MANIFEST = "annotation.json"
PREDICTIONS = "predictions.parquet"
EMBEDDINGS = "embeddings.npy"
ANNOTATED = "annotated.h5ad"
OBSM_KEY = "X_geneformer"
UNASSIGNED = "unassigned"
TOP_K = 3
OBS_COLUMNS = ("predicted_label", "predicted_confidence", "predicted_unassigned")


class AnnotateError(ValueError):
    """The annotation cannot go ahead (the message says why and how to fix it)."""


@dataclass(frozen=True)
class Settings:
    """What an annotation uses, resolved from a params file's ``annotate:`` section and the caller's options."""

    model: str
    min_confidence: float
    min_gene_coverage: float
    shards: int
    chunk_cells: int
    batch_size: int
    device: str
    precision: str
    outputs: Path
    tracking_uri: str
    gene_names: str | None = None
    gene_id_type: str | None = None
    label_key: str | None = None
    cpus: float = 2  # torch's threads (the profile's cpus, as training uses)

    @classmethod
    def from_params(cls, params: "Params", **options: Any) -> "Settings":
        """``options`` (model, min_confidence, shards, outputs, ...) override the file; None keeps it."""
        from . import tracking

        a = params.annotate
        profile = params.profile_for("annotate")
        base = dict(
            model=a.model or f"models:/{params.registered_model}@{CHAMPION_ALIAS}",
            min_confidence=a.min_confidence,
            min_gene_coverage=a.min_gene_coverage,
            shards=a.shards,
            chunk_cells=a.chunk_cells,
            batch_size=a.batch_size or profile.batch_size,
            device=profile.device,
            precision=profile.precision,
            outputs=params.outputs_path,
            tracking_uri=tracking.tracking_uri(params),
            gene_names=a.gene_names,
            gene_id_type=a.gene_id_type,
            label_key=a.label_key,
            cpus=profile.cpus,
        )
        base.update({k: v for k, v in options.items() if v is not None})
        base["outputs"] = Path(base["outputs"]).resolve()
        return cls(**base)

    def to_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Settings":
        return cls(**{**d, "outputs": Path(d["outputs"])})


CHAMPION_ALIAS = "champion"


# ------------------------------------------------------------------ the model --------


def resolve_model(ref: str, *, tracking_uri: str, cache: Path) -> tuple[Path, dict[str, Any]]:
    """A model reference -> (package folder, identity). The identity's ``key`` names the model version in
    annotation folders: ``<name>-v<version>`` for the registry, ``run-<weights sha256[:12]>`` for a folder."""
    from . import registry

    if str(ref).startswith("models:/"):
        alias = registry.parse_model_ref(ref)[2]
        mv = registry.resolve(ref, tracking_uri)
        key = f"{mv.name}-v{mv.version}"
        dest = Path(cache) / key / registry.PACKAGE
        if not (dest / registry.WORKFLOW).is_file():
            registry.load(f"models:/{mv.name}/{mv.version}", tracking_uri, dest)
        return dest, {"ref": ref, "name": mv.name, "version": str(mv.version), "alias": alias, "key": key}
    folder = Path(ref).expanduser().resolve()
    if (folder / registry.WORKFLOW).is_file():  # a package folder (registry.load or build_package)
        return folder, _folder_identity(ref, folder, folder)
    model_dir, run_folder = _run_model(folder)
    identity = _folder_identity(ref, folder, model_dir)  # hashes the weights: once
    dest = Path(cache) / identity["key"] / registry.PACKAGE
    if not (dest / registry.WORKFLOW).is_file():
        params = runs.Run.load(run_folder).params  # the run's pinned params, as this process sees their paths
        validation = _validation_of(model_dir)
        with files.atomic(dest, directory=True) as tmp:
            registry.build_package(params, model_dir, tmp, validation=validation)
    return dest, identity


def _folder_identity(ref: str, folder: Path, model_dir: Path) -> dict[str, Any]:
    from . import modeling

    sha = files.file_sha256(model_dir / modeling.WEIGHTS)[:12]
    return {"ref": str(ref), "name": folder.name, "version": f"sha256:{sha}", "alias": None, "key": f"run-{sha}"}


def _run_model(folder: Path) -> tuple[Path, Path]:
    """(model folder, the run or trial folder holding it) of a run folder, a trial folder or a ``model/`` folder."""
    from . import modeling

    if not folder.exists():
        raise AnnotateError(
            f"model {folder} does not exist. Fix: give models:/<name>@<alias>, models:/<name>/<version>, "
            "or the folder of a run whose fine_tune stage completed."
        )
    model_dir = folder if (folder / modeling.WEIGHTS).is_file() else folder / stages.get("fine_tune").output
    if not (model_dir / modeling.WEIGHTS).is_file():
        raise AnnotateError(
            f"{folder} holds no fine-tuned model ({model_dir / modeling.WEIGHTS} is missing). "
            "Fix: give a run folder whose fine_tune stage completed (or one of its trials/<k>/)."
        )
    for up in (model_dir, *model_dir.parents):
        candidates = sorted((up / "params").glob("*.yaml")) if (up / "params").is_dir() else []
        candidates = [c for c in candidates if c.name != "profiles.yaml"]
        if (up / "run.json").is_file() and candidates:
            return model_dir, up
    raise AnnotateError(
        f"{model_dir} is not inside a run folder (no run.json and params/ above it), so its tokenizer "
        "settings are unknown. Fix: give the run folder itself, or a registered model (models:/...)."
    )


def _validation_of(model_dir: Path) -> dict[str, Any]:
    info = model_dir / "model_info.json"
    if info.is_file():
        return dict(json.loads(info.read_text()).get("validation") or {})
    return {}


# ------------------------------------------------------------------ the steps --------


def annotation_root(outputs: Path) -> Path:
    return Path(outputs) / "annotate"


def find_done(outputs: Path, sha: str, key: str) -> Path | None:
    """An earlier successful annotation of this content (any file name) by this model version."""
    for m in sorted(annotation_root(outputs).glob(f"{sha[:12]}-*/{key}/{MANIFEST}")):
        try:
            if json.loads(m.read_text()).get("status") == "success":
                return m.parent
        except (OSError, json.JSONDecodeError):
            continue
    return None


def read_manifest(run_dir: Path) -> dict[str, Any]:
    p = Path(run_dir) / MANIFEST
    if not p.is_file():
        raise AnnotateError(f"{p} does not exist. Fix: run the prepare step (helical-workflow annotate) first.")
    return json.loads(p.read_text())


def _update(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Change the manifest under the folder's lock (shards and the finish step may write it at once)."""
    with files.file_lock(Path(run_dir) / ".annotation.lock"):
        m = read_manifest(run_dir)
        m.update(fields)
        files.write_json(Path(run_dir) / MANIFEST, m)
    return m


def prepare(input_path: str | os.PathLike, settings: Settings, *, force: bool = False) -> tuple[Path, bool]:
    """Check the input and the model, and open the annotation folder. Returns (folder, already done):
    with ``already done`` the folder is an earlier successful annotation of the same content by the same
    model version, and there is nothing to do (unless ``force``)."""
    from .tokenize import read
    from .tokenize.rank import RankValueTokenizer, gene_coverage, map_genes

    path = Path(input_path).expanduser().resolve()
    data_mod.open_h5(path).close()  # missing, truncated or not HDF5: a DatasetError with the fix
    try:
        n_obs = read.n_obs(path)
    except KeyError as e:
        raise data_mod.DatasetError(
            f"{path} is HDF5 but not an AnnData file ({e}). Fix: write it with AnnData.write_h5ad."
        ) from None
    if n_obs == 0:
        raise data_mod.DatasetError(f"{path} has no cells. Fix: check the file; nothing to annotate.")
    sha = files.file_sha256(path)
    cache = annotation_root(settings.outputs) / ".models"
    package, identity = resolve_model(settings.model, tracking_uri=settings.tracking_uri, cache=cache)
    done = find_done(settings.outputs, sha, identity["key"])
    if done is not None and not force:
        return done, True

    from . import model as model_mod
    from . import registry

    pparams = registry.package_params(package, data_path=path)
    wf = registry.read_workflow(package)
    gene_names = settings.gene_names or wf["data"].get("gene_names", "index")
    id_type = settings.gene_id_type or wf["data"].get("gene_id_type", "symbol")
    counts = wf["data"].get("counts", "X")
    spec = wf["model_spec"]
    tk = RankValueTokenizer.from_files(
        model_mod.model_paths(pparams)["version_dir"],
        input_size=spec["input_size"],
        special_token=spec["special_token"],
    )
    names = read.read_gene_names(path, counts, gene_names)
    ensembl = map_genes(names, id_type, tk.mapping)
    _, cov = gene_coverage(names, ensembl, tk.token_dict)
    if cov["coverage"] < settings.min_gene_coverage:
        raise AnnotateError(
            f"only {cov['in_vocabulary']} of the {cov['genes']} genes of {path.name} "
            f"({cov['coverage']:.1%}) are in the vocabulary of model {identity['key']} "
            f"(needed: {settings.min_gene_coverage:.0%}; gene names from var '{gene_names}' as {id_type}; "
            f"examples not found: {', '.join(cov['unmapped_examples'][:5]) or 'none'}). "
            "Fix: give the gene names column (annotate.gene_names / --gene-names) and id type "
            "(--gene-id-type symbol|ensembl) of this file, use a model for this species, or lower "
            "annotate.min_gene_coverage."
        )
    label_key = settings.label_key or wf.get("label_key")
    has_labels = bool(label_key) and label_key in data_mod.obs_keys(path)
    run_dir = annotation_root(settings.outputs) / f"{sha[:12]}-{_stem(path)}" / identity["key"]
    if run_dir.exists():  # an earlier failed or forced attempt: start clean
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    files.write_json(
        run_dir / MANIFEST,
        {
            "status": "running",
            "started": files.now_iso(),
            "input": str(path),
            "sha256": sha,
            "n_obs": n_obs,
            "model": identity,
            "package": str(package),
            "labels": wf["labels"],
            "label_key": label_key if has_labels else None,
            "gene_names": gene_names,
            "gene_id_type": id_type,
            "counts": counts,
            "gene_coverage": cov,
            "settings": settings.to_json(),
            "shards": [str(s) for s in Shard.all(settings.shards)],
        },
    )
    return run_dir, False


def _stem(path: Path) -> str:
    stem = path.name.removesuffix(".h5ad")
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in stem)[:60] or "input"


def annotate_shard(run_dir: Path, shard: Shard | str | None = None) -> dict[str, Any]:
    """Tokenize and predict one row range of the input into ``shards/<shard>/`` (written atomically)."""
    from datasets import load_from_disk

    from . import model as model_mod
    from . import modeling, registry
    from .tokenize import read
    from .tokenize.rank import RankValueTokenizer, map_genes
    from .tokenize.write import tokenize_rows

    run_dir = Path(run_dir)
    m = read_manifest(run_dir)
    s = Settings.from_json(m["settings"])
    shard = Shard.parse(shard) or Shard(0, 1)
    if shard.n != s.shards:
        raise AnnotateError(f"shard {shard} does not match annotate.shards {s.shards} of {run_dir}.")
    path = Path(m["input"])
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(modeling.cpu_threads(s.cpus))
    pm = registry.open_package(Path(m["package"]), device=s.device, batch_size=s.batch_size, precision=s.precision)
    spec = pm.workflow["model_spec"]
    tk = RankValueTokenizer.from_files(
        model_mod.model_paths(pm.params)["version_dir"],
        input_size=spec["input_size"],
        special_token=spec["special_token"],
    )
    names = read.read_gene_names(path, m["counts"], m["gene_names"])
    ensembl = map_genes(names, m["gene_id_type"], tk.mapping)
    rows = np.arange(*shard.bounds(m["n_obs"]), dtype=np.int64)
    tok_dir = run_dir / "tokenized" / shard.name
    res = tokenize_rows(
        path,
        tok_dir,
        tk,
        counts=m["counts"],
        ensembl_ids=list(ensembl),
        gene_names=list(names),
        rows=rows,
        columns={"row": rows},
        n_counts=read.size_factor_column(path),
        workers=1,
        dataset_label=path.name,
    )
    t_tok = time.perf_counter() - t0
    ds = load_from_disk(str(tok_dir))
    store = modeling.TokenStore(ds)
    kept_rows = np.asarray(ds.data.table.column("row").to_numpy(), dtype=np.int64)
    n, n_cls, emb = len(store), len(pm.labels), int(spec["embsize"])
    with runs.stage_output(run_dir / "shards", shard.name) as tmp:
        np.save(tmp / "rows.npy", kept_rows)
        logits, embs = _NpyWriter(tmp / "logits.npy", (n, n_cls)), _NpyWriter(tmp / EMBEDDINGS, (n, emb))
        for a in range(0, n, s.chunk_cells):  # a chunk at a time: memory does not grow with the cells
            idx = np.arange(a, min(a + s.chunk_cells, n))
            lg, em = modeling.predict(
                pm.model,
                store,
                idx,
                batch_size=s.batch_size,
                device=pm.device,
                precision=s.precision,
                pad_id=pm.model.pad_token_id,
            )
            logits.write(lg)
            block = np.zeros((len(idx), emb), dtype=np.float32)
            block[:, : em.shape[1]] = em
            embs.write(block)
        logits.close()
        embs.close()
        summary = {
            "shard": str(shard),
            "rows": [int(rows[0]), int(rows[-1]) + 1] if len(rows) else [0, 0],
            "cells": int(n),
            "no_tokens": int(res.dropped_zero_count),
            "tokenize_seconds": t_tok,
            "seconds": time.perf_counter() - t0,
            "device": pm.device,
        }
        files.write_json(tmp / "summary.json", summary)
    shutil.rmtree(tok_dir)  # tokens are cheap to recompute and as large as the input's nonzeros
    return summary


class _NpyWriter:
    """A float32 ``.npy`` file of ``shape`` written a block of rows at a time, in order: unlike a memory map
    of the whole array, its written pages do not add up in this process's RSS."""

    def __init__(self, path: Path, shape: tuple[int, int]):
        self.path, self.shape, self.rows = Path(path), (int(shape[0]), int(shape[1])), 0
        self._f = open(self.path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False}
        np.lib.format.write_array_header_1_0(self._f, {**header, "shape": self.shape})

    def write(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=np.float32).reshape(-1, self.shape[1])
        if self.rows + len(block) > self.shape[0]:
            raise ValueError(f"{self.path}: {self.rows + len(block)} rows written, {self.shape[0]} expected")
        self._f.write(block.tobytes())
        self.rows += len(block)

    def close(self) -> None:
        self._f.close()
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.path}: {self.rows} rows written, {self.shape[0]} expected")


def _read_rows(path: Path, a: int, b: int) -> np.ndarray:
    """Rows [a, b) of a ``.npy`` file, copied out of a memory map dropped at once (its pages leave this
    process's RSS with it)."""
    m = np.load(path, mmap_mode="r")
    try:
        return np.array(m[a:b])
    finally:
        del m


def merge(run_dir: Path) -> dict[str, Any]:
    """The shards -> predictions.parquet, embeddings.npy and annotated.h5ad (each written atomically)."""
    import pyarrow.parquet as pq

    run_dir = Path(run_dir)
    m = read_manifest(run_dir)
    s = Settings.from_json(m["settings"])
    labels = list(m["labels"])
    n_obs, path = int(m["n_obs"]), Path(m["input"])
    parts = []
    for name in m["shards"]:
        d = run_dir / "shards" / Shard.parse(name).name
        if not (d / "summary.json").is_file():
            raise AnnotateError(f"shard {name} of {run_dir} has not run ({d} is missing). Fix: run it first.")
        parts.append(d)
    dim = np.load(parts[0] / EMBEDDINGS, mmap_mode="r").shape[1]
    cats = [*labels, UNASSIGNED]
    codes = np.full(n_obs, len(labels), dtype=np.int16)  # what goes into obs: small per cell
    conf = np.full(n_obs, np.nan, dtype=np.float32)
    cols = [data_mod.ObsColumns.NAMES] + ([m["label_key"]] if m.get("label_key") else [])
    counts = np.zeros(len(cats), dtype=np.int64)
    with (
        files.atomic(run_dir / EMBEDDINGS) as emb_tmp,
        files.atomic(run_dir / PREDICTIONS) as pq_tmp,
        data_mod.ObsColumns(path, cols) as obs,
    ):
        all_emb = _NpyWriter(emb_tmp, (n_obs, dim))
        writer = None
        for d in parts:
            summ = json.loads((d / "summary.json").read_text())
            lo, hi = summ["rows"]
            rows = np.load(d / "rows.npy")  # the rows of the shard's cells with tokens, ascending
            if np.any(np.diff(rows) <= 0):
                raise AnnotateError(f"{d / 'rows.npy'} is not in ascending order. Fix: run the shard again.")
            for a in range(lo, hi, s.chunk_cells):  # row range [a, b) of the input, in order
                b = min(a + s.chunk_cells, hi)
                i, j = np.searchsorted(rows, [a, b])
                pos = rows[i:j] - a
                block_emb = np.full((b - a, dim), np.nan, dtype=np.float32)
                block_emb[pos] = _read_rows(d / EMBEDDINGS, i, j)
                all_emb.write(block_emb)
                table, c_codes, c_conf = _prediction_block(
                    obs, a, b, pos, _read_rows(d / "logits.npy", i, j), labels, s.min_confidence, m.get("label_key")
                )
                codes[a:b], conf[a:b] = c_codes, c_conf
                counts += np.bincount(c_codes, minlength=len(cats))
                if writer is None:
                    writer = pq.ParquetWriter(str(pq_tmp), table.schema)
                writer.write_table(table)
        if writer is None:
            raise AnnotateError(f"{path} produced no predictions.")
        writer.close()
        all_emb.close()
    _write_annotated(run_dir, path, codes, cats, conf, s.min_confidence)
    summary = {
        "cells": n_obs,
        "annotated": int(np.isfinite(conf).sum()),
        "no_tokens": int((~np.isfinite(conf)).sum()),
        "unassigned": int(counts[-1]),
        "label_counts": {c: int(k) for c, k in zip(cats, counts) if k},
        "outputs": {k: str(run_dir / k) for k in (PREDICTIONS, EMBEDDINGS, ANNOTATED)},
    }
    _update(run_dir, merged=summary)
    return summary


def _prediction_block(obs, a, b, pos, logits, labels, min_conf, label_key):
    import pyarrow as pa
    from scipy.special import softmax

    n = b - a
    probs = softmax(logits.astype(np.float64), axis=1) if len(logits) else np.zeros((0, len(labels)))
    k = min(TOP_K, len(labels))
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    conf = np.full(n, np.nan, dtype=np.float32)
    conf[pos] = probs[np.arange(len(pos)), top[:, 0]] if len(pos) else []
    codes = np.full(n, len(labels), dtype=np.int16)  # unassigned unless confident
    ok = np.zeros(n, dtype=bool)
    ok[pos] = conf[pos] >= min_conf
    codes[pos] = np.where(ok[pos], top[:, 0], len(labels))
    cats = [*labels, UNASSIGNED]
    cols: dict[str, Any] = {
        "cell_id": pa.array(np.asarray(obs.read(data_mod.ObsColumns.NAMES, a, b)).astype(str)),
        "row": pa.array(np.arange(a, b, dtype=np.int64)),
        "predicted_label": pa.DictionaryArray.from_arrays(pa.array(codes), pa.array(cats)),
        "confidence": pa.array(conf),
        "unassigned": pa.array(codes == len(labels)),
        "has_tokens": pa.array(np.isin(np.arange(n), pos)),
    }
    for j in range(TOP_K):
        lab = np.full(n, -1, dtype=np.int16)
        p = np.full(n, np.nan, dtype=np.float32)
        if j < k and len(pos):
            lab[pos] = top[:, j]
            p[pos] = probs[np.arange(len(pos)), top[:, j]]
        mask = lab < 0
        cols[f"top{j + 1}_label"] = pa.DictionaryArray.from_arrays(
            pa.array(np.where(mask, 0, lab), mask=mask), pa.array(labels)
        )
        cols[f"top{j + 1}_probability"] = pa.array(p, mask=mask)
    if label_key:
        truth = obs.read(label_key, a, b)
        missing = data_mod.missing_labels(truth)
        cols["true_label"] = pa.array(np.asarray(truth).astype(str), mask=missing)
    return pa.table(cols), codes, conf


def _write_annotated(run_dir: Path, src: Path, codes, cats, conf, min_conf: float) -> None:
    """The input copied byte for byte (``X`` and everything else never decoded), plus the predictions in
    ``obs`` and the embeddings in ``obsm["X_geneformer"]``, written to the copy with h5py."""
    import h5py
    import pandas as pd
    from anndata.io import write_elem

    emb_path = run_dir / EMBEDDINGS
    shape = np.load(emb_path, mmap_mode="r").shape
    with files.atomic(run_dir / ANNOTATED) as tmp:
        shutil.copyfile(src, tmp)
        with h5py.File(tmp, "r+") as f:
            obs = f["obs"]
            order = [c for c in obs.attrs.get("column-order", []) if c not in OBS_COLUMNS]
            new = {
                "predicted_label": pd.Categorical.from_codes(codes.astype(np.int64), categories=cats),
                "predicted_confidence": conf,
                "predicted_unassigned": codes == len(cats) - 1,
            }
            for name, values in new.items():
                if name in obs:
                    del obs[name]
                write_elem(obs, name, values)
            obs.attrs["column-order"] = np.array([*order, *new], dtype=object)
            obsm = f["obsm"] if "obsm" in f else f.create_group("obsm")
            if "obsm" not in f.attrs.get("encoding-type", "") and "encoding-type" not in obsm.attrs:
                obsm.attrs["encoding-type"], obsm.attrs["encoding-version"] = "dict", "0.1.0"
            if OBSM_KEY in obsm:
                del obsm[OBSM_KEY]
            rows_per_chunk = max(1, (1 << 20) // max(shape[1] * 4, 1))
            dset = obsm.create_dataset(
                OBSM_KEY, shape=shape, dtype=np.float32, chunks=(min(rows_per_chunk, shape[0]), shape[1])
            )
            dset.attrs["encoding-type"], dset.attrs["encoding-version"] = "array", "0.2.0"
            for a in range(0, shape[0], 65536):
                dset[a : a + 65536] = _read_rows(emb_path, a, min(a + 65536, shape[0]))


def finish(run_dir: Path, report: Path | None = None) -> dict[str, Any]:
    """Mark the annotation complete (only now does it count as done) and drop the per-shard scratch."""
    shutil.rmtree(Path(run_dir) / "shards", ignore_errors=True)
    shutil.rmtree(Path(run_dir) / "tokenized", ignore_errors=True)
    return _update(
        run_dir, status="success", finished=files.now_iso(), report=str(report) if report else None, error=None
    )


def fail(run_dir: Path, error: BaseException | str) -> None:
    """Record a failure: the folder stays, marked failed, and is not taken for a finished annotation."""
    if (Path(run_dir) / MANIFEST).is_file():
        _update(run_dir, status="failed", finished=files.now_iso(), error=str(error))


def annotate(input_path: str | os.PathLike, settings: Settings, *, force: bool = False) -> tuple[Path, bool]:
    """The steps of one input in a row, in this process, without a run or a report (a library call: the
    command line and the DAG run the stages). Returns (annotation folder, was already done)."""
    run_dir, done = prepare(input_path, settings, force=force)
    if done:
        return run_dir, True
    try:
        for shard in Shard.all(settings.shards):
            annotate_shard(run_dir, shard)
        merge(run_dir)
        finish(run_dir)
    except BaseException as e:
        fail(run_dir, e)
        raise
    return run_dir, False


# ------------------------------------------------------------------ the stages -------
# What the annotation stages' notebooks call: each input of the run (``annotate.inputs``) through the steps above.

PLAN = "plan.json"
EVENT = "event.json"  # what the run did, with host paths: the extra of the finish stage's asset event (Stage.emits)
HOST_PATHS = ("input", "run_dir", PREDICTIONS, EMBEDDINGS, ANNOTATED, "report")


def _plan(run: "Run") -> dict[str, Any]:
    return json.loads((run.input("annotate_prepare") / PLAN).read_text())


def _folder(run: "Run", entry: dict[str, Any]) -> Path:
    """An input's annotation folder, as this process sees the outputs folder (the plan keeps it relative)."""
    return run.params.outputs_path / entry["folder"]


def prepare_stage(run: "Run") -> dict[str, Any]:
    """``annotate_prepare``: each input checked (file, genes against the model's vocabulary), its folder opened,
    or found annotated already by this model version. A bad input is recorded and the others go on; the stage
    fails only when no input can be annotated."""
    a = run.params.annotate
    if not a.inputs:
        raise AnnotateError(
            "no input: this run was neither started by a file in the watched folder nor given one. Fix: trigger "
            'with conf {"annotate.inputs": ["/path/to/file.h5ad"]}, drop the file into '
            f"{run.params.resolve(run.params.watch.incoming)}, or run `helical-workflow annotate FILE`."
        )
    settings = Settings.from_params(run.params)
    entries: list[dict[str, Any]] = []
    for given in a.inputs:
        path = run.params.resolve(given)
        try:
            folder, done = prepare(path, settings, force=a.force)
        except Exception as e:
            print(f"{path}: {e}")
            entries.append({"input": str(path), "error": str(e)})
            continue
        m = read_manifest(folder)
        if done:
            print(f"{path}: already annotated by {m['model']['key']} (same content): {folder}")
        else:
            _update(folder, run=str(run.dir))
        entries.append(
            {
                "input": str(path),
                "folder": str(folder.relative_to(settings.outputs)),
                "done": done,
                "cells": int(m["n_obs"]),
                "model": m["model"]["key"],
                "gene_coverage": m["gene_coverage"]["coverage"],
            }
        )
    if not any("folder" in e for e in entries):
        raise AnnotateError(_errors(entries))
    plan = {"inputs": entries}
    with run.output("annotate_prepare") as tmp:
        files.write_json(tmp / PLAN, plan)
    return plan


def _errors(entries: list[dict[str, Any]]) -> str:
    bad = [e for e in entries if "error" in e]  # an error names its file, or gets the file's name first
    return "could not annotate: " + "; ".join(
        e["error"] if Path(e["input"]).name in e["error"] else f"{e['input']}: {e['error']}" for e in bad
    )


def shard_stage(run: "Run", shard: Shard | str | None) -> dict[str, Any]:
    """``annotate`` (one task per row shard): this row range of every input to annotate."""
    shard = Shard.parse(shard) or Shard(0, 1)
    done = [annotate_shard(_folder(run, e), shard) for e in _plan(run)["inputs"] if "folder" in e and not e["done"]]
    summary = {
        "shard": str(shard),
        "cells": sum(d["cells"] for d in done),
        "seconds": sum(d["seconds"] for d in done),
        "inputs": len(done),
    }
    with files.atomic(run.dir / stages.get("annotate").output / f"{shard.name}.json") as tmp:
        files.write_json(tmp, summary)
    return summary


def finish_stage(run: "Run") -> dict[str, Any]:
    """``annotate_finish``: each input's shards merged into its outputs, and the input marked annotated; the
    run's event (its annotations, for downstream DAGs). Fails, after the others are finished, when an input
    could not be annotated."""

    entries = _plan(run)["inputs"]
    report = run.dir / "reports" / Path(stages.get("annotate_finish").notebook_name(None)).with_suffix(".html")
    results = []
    for e in entries:
        if "folder" not in e:
            continue
        folder = _folder(run, e)
        if not e["done"]:
            try:
                merge(folder)
                finish(folder, report)
            except BaseException as ex:
                fail(folder, ex)
                raise
        m = read_manifest(folder)
        results.append(
            {
                "input": e["input"],
                "run_dir": str(folder),
                "already_annotated": e["done"],
                "model": m["model"]["key"],
                "cells": (m.get("merged") or {}).get("cells"),
                **(m.get("merged") or {}).get("outputs", {}),
                "report": m.get("report"),
            }
        )
    summary = {"annotations": results, "errors": [e for e in entries if "error" in e]}
    # read on the host (the Airflow side, the command line): paths as the host sees them (a container maps back)
    host = [{k: runs.host_path(v) if k in HOST_PATHS and v else v for k, v in r.items()} for r in results]
    with run.output("annotate_finish") as tmp:
        files.write_json(tmp / EVENT, {**summary, "run": runs.host_path(run.dir), "annotations": host})
    if summary["errors"]:
        raise AnnotateError(_errors(entries) + " (the run's other inputs are annotated)")
    return summary


def input_outcomes(plan: dict[str, Any]) -> dict[str, int]:
    """How many inputs of a run are new, annotated earlier, or failed (the prepare stage's metric)."""
    out = {"new": 0, "done": 0, "failed": 0}
    for e in plan["inputs"]:
        out["failed" if "error" in e else "done" if e["done"] else "new"] += 1
    return out


def scores_table(scores: dict[str, Any]):
    """The agreement with the input's own labels as a table (not a raw dict)."""
    import pandas as pd

    names = {
        "accuracy": "accuracy",
        "macro_f1": "macro-F1",
        "scored_cells": "cells scored (label known to the model)",
        "unknown_labels": "cells whose label the model does not know",
        "note": "note",
    }
    return pd.DataFrame({"value": {names.get(k, k): v for k, v in scores.items()}})


def load_summary(run_dir: Path) -> dict[str, Any]:
    """What an annotation run did (its asset event's extra): its run folder, annotations and errors, host paths."""
    return json.loads((Path(run_dir) / stages.get("annotate_finish").output / EVENT).read_text())


# ------------------------------------------------------------------ reading back -----


def load_predictions(run_dir: Path):
    import pandas as pd

    df = pd.read_parquet(Path(run_dir) / PREDICTIONS)
    for c in df.columns:
        if isinstance(df[c].dtype, pd.CategoricalDtype):
            df[c] = df[c].astype(object).where(df[c].notna(), None)
    return df


# ------------------------------------------------------------------ the report -------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def overview(run_dir: Path):
    """One table: input, model, coverage, cells, unassigned, no tokens."""
    import pandas as pd

    m = read_manifest(run_dir)
    merged, cov = m.get("merged") or {}, m["gene_coverage"]
    rows = {
        "input": m["input"],
        "sha256": m["sha256"][:16],
        "model": f"{m['model']['ref']} ({m['model']['key']})",
        "gene coverage": f"{cov['in_vocabulary']} of {cov['genes']} genes ({cov['coverage']:.1%})",
        "cells": merged.get("cells"),
        "unassigned (confidence < {:.2f})".format(m["settings"]["min_confidence"]): merged.get("unassigned"),
        "cells without tokens": merged.get("no_tokens"),
        "shards": len(m["shards"]),
    }
    return pd.DataFrame({"value": rows})


def plot_counts(preds, path: Path) -> Path:
    plt = _plt()
    counts = preds["predicted_label"].value_counts()
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(counts) + 1.5))
    counts.iloc[::-1].plot.barh(ax=ax, color=["#bbbbbb" if i == UNASSIGNED else "#3b7dd8" for i in counts.index[::-1]])
    ax.set(xlabel="cells", title="Predicted labels")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confidence(preds, min_confidence: float, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.hist(preds["confidence"].dropna(), bins=40, range=(0, 1), color="#3b7dd8")
    ax.axvline(min_confidence, color="#d83b3b", ls="--", label=f"min_confidence {min_confidence:.2f}")
    ax.set(xlabel="confidence (top probability)", ylabel="cells", title="Confidence")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_umap(run_dir: Path, preds, path: Path, *, max_cells: int = 20000, seed: int = 0) -> Path | None:
    """UMAP of the cell embeddings (a random subset of at most ``max_cells``), by top label and by confidence."""
    import anndata
    import pandas as pd
    import scanpy as sc

    plt = _plt()
    emb = np.load(Path(run_dir) / EMBEDDINGS, mmap_mode="r")
    idx = np.flatnonzero(preds["has_tokens"].to_numpy())
    if len(idx) < 10:
        return None
    if len(idx) > max_cells:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_cells, replace=False))
    obs = pd.DataFrame(
        {
            "top label": preds["top1_label"].iloc[idx].astype(str).to_numpy(),
            "confidence": preds["confidence"].iloc[idx].to_numpy(),
        },
        index=[str(i) for i in idx],
    )
    ad = anndata.AnnData(X=np.asarray(emb[idx], dtype=np.float32), obs=obs)
    sc.pp.neighbors(ad, use_rep="X", n_neighbors=min(15, len(ad) - 1), random_state=seed)
    sc.tl.umap(ad, random_state=seed)
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    sc.pl.umap(ad, color="top label", ax=axes[0], show=False, title="top label (before min_confidence)")
    sc.pl.umap(ad, color="confidence", ax=axes[1], show=False, title="confidence", vmin=0, vmax=1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def least_confident(preds, n: int = 20):
    cols = ["cell_id", "predicted_label", "confidence", "top1_label", "top1_probability", "top2_label"]
    cols += ["top2_probability"] + (["true_label"] if "true_label" in preds else [])
    return preds[preds["has_tokens"]].nsmallest(n, "confidence")[cols]


def score_against_labels(run_dir: Path, preds, path: Path) -> dict[str, Any] | None:
    """Accuracy and macro-F1 of the top label against the input's own labels (cells whose label the model
    knows), and a confusion matrix; None when the input has no label column."""
    from . import evaluate

    if "true_label" not in preds:
        return None
    labels = list(read_manifest(run_dir)["labels"])
    known = preds["true_label"].isin(labels) & preds["has_tokens"]
    if not known.any():
        return {"scored_cells": 0, "note": "none of the input's labels is a label of the model"}
    ids = {lab: i for i, lab in enumerate(labels)}
    y_true = preds.loc[known, "true_label"].map(ids).to_numpy()
    y_pred = preds.loc[known, "top1_label"].map(ids).to_numpy()
    metrics = evaluate.classification_metrics(y_true, y_pred, labels)
    evaluate.plot_confusion(metrics["confusion_matrix"], path, cells="input cells with a known label")
    out = {k: metrics[k] for k in ("accuracy", "macro_f1")}
    return {**out, "scored_cells": int(known.sum()), "unknown_labels": int((~known & preds["has_tokens"]).sum())}
