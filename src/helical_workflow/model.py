"""Geneformer model files: resolve them from the local cache, offline, through helical.

helical's ``Downloader.download_via_name`` re-validates every cached file with a HEAD
request and *deletes* the file when that fails (for example with no network). When the
files are present we therefore never let it run: :func:`cache_only_downloader` stands
in for it while helical builds the model, and only a file that is really missing goes
to helical's real downloader.

``model.source: local_tiny`` builds a small Geneformer-shaped BERT and the token,
gene-median and Ensembl-mapping dictionaries from the dataset, written in helical's
cache layout, and loaded through exactly the same code as a downloaded model.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import files, stages

if TYPE_CHECKING:
    from .params import Params

log = logging.getLogger(__name__)

DICTIONARIES = ("gene_median_dictionary.pkl", "token_dictionary.pkl", "ensembl_mapping_dict.pkl")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
LOCAL_ID_PREFIX = "ENSGLOCAL"


class ModelFilesMissing(FileNotFoundError):
    pass


def cache_root(prefix: Path) -> Path:
    """helical's CACHE_DIR_HELICAL for a given CACHE_DIR_HELICAL_PREFIX."""
    return Path(prefix) / ".cache" / "helical" / "models"


def model_paths(params: "Params") -> dict[str, Path]:
    spec = params.model.spec
    vdir = cache_root(params.model_cache_prefix) / "geneformer" / spec["version"]
    return {
        "version_dir": vdir,
        "model_files_dir": vdir / params.model.name,
        "gene_median_path": vdir / "gene_median_dictionary.pkl",
        "token_path": vdir / "token_dictionary.pkl",
        "ensembl_dict_path": vdir / "ensembl_mapping_dict.pkl",
    }


def missing_files(params: "Params") -> list[Path]:
    p = model_paths(params)
    missing = [p["version_dir"] / d for d in DICTIONARIES if not (p["version_dir"] / d).is_file()]
    if not (p["model_files_dir"] / "config.json").is_file():
        missing.append(p["model_files_dir"] / "config.json")
    if not any((p["model_files_dir"] / w).is_file() for w in WEIGHT_FILES):
        missing.append(p["model_files_dir"] / WEIGHT_FILES[1])
    return missing


@contextlib.contextmanager
def cache_only_downloader(root: Path) -> Iterator[None]:
    """Replace helical's Downloader while a model is built: files must already be in ``root``."""
    import helical.models.geneformer.model as gm

    class CacheOnlyDownloader:
        def download_via_name(self, name: str) -> None:
            path = Path(root) / name
            if path.is_file():
                return
            if path.name == "pytorch_model.bin" and (path.parent / "model.safetensors").is_file():
                return
            raise ModelFilesMissing(
                f"model file {path} is missing. Fix: run once with network access "
                "(model.source: helical downloads it), or copy the files into that folder."
            )

    original = gm.Downloader
    gm.Downloader = CacheOnlyDownloader
    try:
        yield
    finally:
        gm.Downloader = original


def download_missing(params: "Params") -> None:
    """helical's real download path, for files not in the cache (needs network)."""
    import helical.utils.downloader as dl
    from helical.models.geneformer import GeneformerConfig

    cfg = GeneformerConfig(model_name=params.model.name)
    root = cache_root(params.model_cache_prefix)
    original = dl.CACHE_DIR_HELICAL
    dl.CACHE_DIR_HELICAL = root
    try:
        d = dl.Downloader()
        for name in cfg.list_of_files_to_download:
            path = root / name
            if path.is_file() or (path.name == "pytorch_model.bin" and (path.parent / "model.safetensors").is_file()):
                continue  # never let helical re-validate (and delete) a file we have
            try:
                d.download_via_name(name)
            except Exception as e:
                raise ModelFilesMissing(
                    f"could not download {name} for model {params.model.name} into {root} ({e}). "
                    "Fix: run where the network is reachable once, or copy the model files there."
                ) from None
    finally:
        dl.CACHE_DIR_HELICAL = original


def ensure_model_files(params: "Params", run_dir: Path | None = None) -> dict[str, Path]:
    """Make sure the dictionaries and weights exist: build them (local_tiny) or download them (helical)."""
    missing = missing_files(params)
    if missing:
        if params.model.source == "local_tiny":
            if run_dir is None:
                raise ModelFilesMissing("the local model is built from a run's load stage output; pass run_dir")
            build_local_tiny_model(params, run_dir)
        else:
            download_missing(params)
    return model_paths(params)


def _build_lock(dir_: Path):
    return files.file_lock(Path(dir_) / ".build.lock")


def _local_gene_ids(genes: list[str]) -> dict[str, str]:
    return {g: f"{LOCAL_ID_PREFIX}{i:08d}" for i, g in enumerate(genes)}


def build_local_dictionaries(params: "Params", run_dir: Path, max_cells: int = 20000) -> None:
    """Token, gene-median and Ensembl-mapping dictionaries built from the dataset.

    Genes detected in the load stage get local Ensembl-style ids; medians are the
    non-zero medians of counts normalised to 10,000 per cell (Geneformer's definition),
    from at most ``max_cells`` cells.
    """
    import pandas as pd

    from .data import CountsReader

    paths = model_paths(params)
    genes_df = pd.read_csv(Path(run_dir) / stages.get("load").output / "genes.csv", index_col=0)
    genes_df["gene"] = genes_df["gene"].astype(str)
    detected = genes_df["n_cells"].to_numpy() > 0
    symbols = genes_df["gene"].tolist()
    uniq = list(dict.fromkeys(s for s, d in zip(symbols, detected) if d))
    ids = _local_gene_ids(uniq)
    col_of = {}
    for j, s in enumerate(symbols):
        if detected[j]:
            col_of.setdefault(s, []).append(j)
    values: list[list[np.ndarray]] = [[] for _ in symbols]
    with CountsReader(params.data_path, params.data.counts) as r:
        stop = min(r.n_obs, max_cells)
        for _, block in r.chunks(params.data.chunk_size, 0, stop):
            norm = normalize_total(block).tocsc()
            for j in np.nonzero(detected)[0]:
                v = norm.data[norm.indptr[j] : norm.indptr[j + 1]]
                if v.size:
                    values[j].append(v[v > 0])
    medians = {}
    for s in uniq:
        vals = [v for j in col_of[s] for v in values[j]]
        allv = np.concatenate(vals) if vals else np.array([1.0])
        medians[ids[s]] = float(np.median(allv)) if allv.size else 1.0
    special = ["<pad>", "<mask>"] + (["<cls>", "<eos>"] if params.model.spec["special_token"] else [])
    token = {t: i for i, t in enumerate(special)}
    for s in uniq:
        token[ids[s]] = len(token)
    mapping = {}
    for s in uniq:
        mapping[s.upper()] = ids[s]
        mapping[ids[s]] = ids[s]
    write_dictionaries(paths["version_dir"], token=token, medians=medians, mapping=mapping)


def write_dictionaries(folder: Path, *, token: dict, medians: dict, mapping: dict) -> Path:
    """Geneformer's three dictionaries (token ids, gene medians, Ensembl mapping) in helical's file names."""
    folder = Path(folder)
    for name, obj in zip(DICTIONARIES, (medians, token, mapping), strict=True):
        with files.atomic(folder / name) as tmp, open(tmp, "wb") as f:
            pickle.dump(obj, f)
    return folder


def normalize_total(counts, target_sum: float = 10_000, *, log1p: bool = False):
    """Counts scaled to ``target_sum`` per cell (rows; empty rows stay zero), then ``log1p`` if asked:
    scanpy's ``normalize_total`` (+ ``log1p``) on a sparse matrix, as float64 CSR."""
    import scipy.sparse as sp

    X = sp.csr_matrix(counts, dtype=np.float64)
    tot = np.asarray(X.sum(axis=1)).ravel()
    X = sp.diags(target_sum / np.where(tot == 0, 1, tot)) @ X
    if log1p:
        X.data = np.log1p(X.data)
    return X


def build_local_weights(params: "Params") -> None:
    """A randomly initialised BertForMaskedLM with the model's width, input size and vocabulary."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    paths = model_paths(params)
    with open(paths["token_path"], "rb") as f:
        vocab = pickle.load(f)
    spec = params.model.spec
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=spec["embsize"],
        num_hidden_layers=params.model.tiny_layers,
        num_attention_heads=params.model.tiny_heads,
        intermediate_size=params.model.tiny_intermediate_size,
        max_position_embeddings=spec["input_size"],
        pad_token_id=vocab["<pad>"],
        hidden_act="relu",
        hidden_dropout_prob=0.02,
        attention_probs_dropout_prob=0.02,
        layer_norm_eps=1e-12,
    )
    torch.manual_seed(params.model.seed)
    model = BertForMaskedLM(cfg)
    with files.atomic(paths["model_files_dir"], directory=True) as tmp:
        model.save_pretrained(tmp)
        torch.save({"note": "local tiny Geneformer-shaped model built by helical-workflow"}, tmp / "training_args.bin")


def build_local_tiny_model(params: "Params", run_dir: Path) -> None:
    paths = model_paths(params)
    with _build_lock(paths["version_dir"]):
        if not all((paths["version_dir"] / d).is_file() for d in DICTIONARIES):
            log.info("building local dictionaries in %s", paths["version_dir"])
            build_local_dictionaries(params, run_dir)
        if not (paths["model_files_dir"] / "config.json").is_file():
            log.info("building local tiny model in %s", paths["model_files_dir"])
            build_local_weights(params)


def geneformer_config(params: "Params", *, batch_size: int, device: str, **kw: Any):
    """helical's GeneformerConfig with its file paths pointed at this project's cache."""
    from helical.models.geneformer import GeneformerConfig

    cfg = GeneformerConfig(model_name=params.model.name, batch_size=batch_size, device=device, **kw)
    paths = model_paths(params)
    cfg.model_dir = paths["version_dir"].parent
    cfg.files_config = {k: paths[k] for k in ("model_files_dir", "gene_median_path", "token_path", "ensembl_dict_path")}
    return cfg


def load_fine_tuning_model(params: "Params", *, n_classes: int, batch_size: int, device: str):
    """helical's GeneformerFineTuningModel (classification head), loaded from the local cache."""
    from helical.models.geneformer import GeneformerFineTuningModel

    missing = missing_files(params)
    if missing:
        raise ModelFilesMissing(
            "model files missing: "
            + ", ".join(map(str, missing))
            + ". Fix: run the tokenize stage first (it builds or downloads them)."
        )
    cfg = geneformer_config(params, batch_size=batch_size, device=device)
    with cache_only_downloader(cache_root(params.model_cache_prefix)):
        return GeneformerFineTuningModel(
            geneformer_config=cfg, fine_tuning_head="classification", output_size=n_classes
        )
