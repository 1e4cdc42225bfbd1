"""The tokenize stage: counts -> Geneformer rank-value tokens, as Arrow shards.

``tokenize.implementation: helical`` runs helical's own ``TranscriptomeTokenizer``
(``tokenize_anndata`` + ``create_dataset``, what ``Geneformer.process_data`` does after
mapping genes), on the cells the load stage kept. It is the reference implementation:
it holds the selected cells in memory.

Output (``tokenized/`` in the run folder): one Hugging Face ``datasets`` folder per
shard (``shard-00000-of-00001/``) with ``input_ids``, ``length``, ``cell_id``,
``label``, ``label_id`` and ``split``; ``summary.json`` and ``gene_coverage.csv``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from . import data as data_mod
from . import model as model_mod
from . import runs

if TYPE_CHECKING:
    from .params import Params

log = logging.getLogger(__name__)

OUTPUT = "tokenized"
LABELS_FILE = "labels.json"


class TokenizeError(ValueError):
    pass


def shard_name(i: int, n: int) -> str:
    return f"shard-{i:05d}-of-{n:05d}"


def map_genes(names: pd.Series, gene_id_type: str, mapping: dict[str, str]) -> pd.Series:
    """Gene names -> Ensembl ids through the model's Ensembl mapping dictionary.

    Symbols are looked up upper-cased (the dictionary holds symbols and ids as keys);
    with ``gene_id_type: ensembl`` the names are used as they are. Unmapped genes are None.
    """
    names = names.astype(str)
    if gene_id_type == "ensembl":
        return names.where(names.str.len() > 0, None)
    mapped = names.str.upper().map(mapping)
    return mapped.astype(object).where(mapped.notna(), None)


def gene_coverage(names: pd.Series, ensembl: pd.Series, token_dict: dict[str, int],
                  n_cells: np.ndarray | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """How many of the dataset's genes map to tokens, and which do not."""
    df = pd.DataFrame({"gene": names.astype(str).values, "ensembl_id": ensembl.values})
    df["in_vocabulary"] = [e is not None and e in token_dict for e in df["ensembl_id"]]
    if n_cells is not None:
        df["n_cells"] = n_cells
    expressed = df["n_cells"] > 0 if "n_cells" in df else pd.Series(True, index=df.index)
    summary = {
        "genes": int(len(df)),
        "mapped_to_ensembl": int(df["ensembl_id"].notna().sum()),
        "in_vocabulary": int(df["in_vocabulary"].sum()),
        "expressed_in_vocabulary": int((df["in_vocabulary"] & expressed).sum()),
        "coverage": float(df["in_vocabulary"].mean()) if len(df) else 0.0,
        "unmapped_examples": df.loc[~df["in_vocabulary"], "gene"].head(20).tolist(),
    }
    return df, summary


def no_genes_error(params: "Params", cov: dict[str, Any]) -> TokenizeError:
    return TokenizeError(
        f"none of the {cov['genes']} genes of {params.data_path.name} map to tokens of model "
        f"{params.model.name} (mapped to Ensembl: {cov['mapped_to_ensembl']}, in vocabulary: 0; "
        f"examples: {', '.join(cov['unmapped_examples'][:5])}). Fix: check data.gene_names "
        "(the var column with gene names) and data.gene_id_type (symbol or ensembl), and that the "
        "model's dictionaries are for this species."
    )


def label_mapping(split: pd.DataFrame) -> dict[str, int]:
    labels = sorted(split.loc[split.split != "excluded", "label"].dropna().astype(str).unique())
    return {lab: i for i, lab in enumerate(labels)}


def _selected_anndata(params: "Params", split: pd.DataFrame, ensembl: pd.Series, label_ids: dict[str, int]):
    """The kept cells as an in-memory AnnData, in the shape helical's tokenizer expects."""
    import anndata
    import scipy.sparse as sp

    keep = split[split.split != "excluded"]
    rows = keep["row"].to_numpy()
    wanted = np.zeros(len(split), dtype=bool)
    wanted[rows] = True
    blocks = []
    with data_mod.CountsReader(params.data_path, params.data.counts) as r:
        for start, block in r.chunks(params.data.chunk_size):
            sel = np.nonzero(wanted[start : start + block.shape[0]])[0]
            if sel.size:
                blocks.append(block[sel])
    X = sp.vstack(blocks).tocsr()
    backed = data_mod.open_backed(params.data_path)
    try:
        extra = [c for c in ("n_counts", "filter_pass") if c in backed.obs.columns]
        obs_extra = backed.obs[extra].iloc[rows].reset_index(drop=True)
    finally:
        backed.file.close()
    obs = pd.DataFrame({
        "cell_id": keep["cell_id"].astype(str).values,
        "label": keep["label"].astype(str).values,
        "label_id": [label_ids[lab] for lab in keep["label"].astype(str)],
        "split": keep["split"].values,
    })
    for c in extra:
        obs[c] = obs_extra[c].values
    obs.index = obs["cell_id"].values
    var = pd.DataFrame({"ensembl_id": ensembl.values}, index=pd.Index(
        [f"g{i}" for i in range(len(ensembl))]))
    return anndata.AnnData(X=X, obs=obs, var=var)


def tokenize_stage(params: "Params", run_dir: Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    split = data_mod.read_split(run_dir)
    genes = pd.read_csv(run_dir / "load" / "genes.csv", index_col=0)
    model_mod.ensure_model_files(params, run_dir)
    dicts = model_mod.load_dictionaries(params)
    ensembl = map_genes(genes["gene"], params.data.gene_id_type, dicts["ensembl_mapping"])
    cov_table, cov = gene_coverage(genes["gene"], ensembl, dicts["token"], genes["n_cells"].to_numpy())
    if cov["in_vocabulary"] == 0:
        raise no_genes_error(params, cov)
    label_ids = label_mapping(split)

    t0 = time.perf_counter()
    ds = _tokenize_with_helical(params, split, ensembl, label_ids)
    elapsed = time.perf_counter() - t0
    lengths = np.asarray(ds["length"])
    summary = {
        "implementation": params.tokenize.implementation,
        "model": params.model.name,
        "cells": int(len(ds)),
        "shards": 1,
        "seconds": elapsed,
        "cells_per_second": len(ds) / elapsed if elapsed > 0 else None,
        "length": {"min": int(lengths.min()), "median": float(np.median(lengths)), "max": int(lengths.max()),
                   "mean": float(lengths.mean())} if len(lengths) else {},
        "empty_cells": int((lengths == 0).sum()),
        "gene_coverage": cov,
        "labels": label_ids,
    }
    with runs.stage_output(run_dir, OUTPUT) as tmp:
        ds.save_to_disk(str(tmp / shard_name(0, 1)))
        cov_table.to_csv(tmp / "gene_coverage.csv", index=False)
        (tmp / LABELS_FILE).write_text(json.dumps(label_ids, indent=2))
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _tokenize_with_helical(params: "Params", split: pd.DataFrame, ensembl: pd.Series, label_ids: dict[str, int]):
    from helical.models.geneformer.geneformer_tokenizer import TranscriptomeTokenizer

    paths = model_mod.model_paths(params)
    adata = _selected_anndata(params, split, ensembl, label_ids)
    tk = TranscriptomeTokenizer(
        custom_attr_name_dict={"cell_id": "cell_id", "label": "label", "label_id": "label_id", "split": "split"},
        nproc=1,
        chunk_size=params.tokenize.chunk_size,
        model_input_size=params.model.spec["input_size"],
        special_token=params.model.spec["special_token"],
        gene_median_file=paths["gene_median_path"],
        token_dictionary_file=paths["token_path"],
        gene_mapping_file=paths["ensembl_dict_path"],
    )
    cells, meta = tk.tokenize_anndata(adata)
    return tk.create_dataset(cells, meta, use_generator=False)


def load_tokenized(run_dir: Path):
    """All shards of a run's tokenized output, concatenated (memory-mapped Arrow)."""
    from datasets import concatenate_datasets, load_from_disk

    d = runs.require_stage_output(run_dir, OUTPUT, "tokenize")
    shards = sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("shard-"))
    if not shards:
        raise FileNotFoundError(f"{d} holds no shards. Fix: re-run the tokenize stage.")
    parts = [load_from_disk(str(p)) for p in shards]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def read_labels(run_dir: Path) -> dict[str, int]:
    d = runs.require_stage_output(run_dir, OUTPUT, "tokenize")
    return json.loads((d / LABELS_FILE).read_text())


def split_subset(ds, split: str):
    idx = np.nonzero(np.asarray(ds["split"]) == split)[0]
    return ds.select(idx)
