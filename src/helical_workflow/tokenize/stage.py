"""The tokenize stage of a run, and the command-line entry that tokenizes any ``.h5ad``.

:func:`tokenize_stage` tokenizes the cells the load stage kept (one row shard of them per
Airflow task) into ``tokenized/shard-0000i-of-0000n/``, with two implementations chosen by
``tokenize.implementation``: ``streaming`` (default; :func:`.write.tokenize_rows`) and
``helical``, helical's own ``TranscriptomeTokenizer`` on the selected cells held in memory
(the reference; :func:`_tokenize_with_helical`). :func:`tokenize_h5ad` is the command line's
``tokenize``: a whole file (or one row shard of it), streamed, outside any run.

Shards are contiguous, near-equal ranges of the cells to tokenize (:meth:`stages.Shard.bounds`):
in the stage, of the cells the load stage kept, before ``filter_pass``; on the command line,
of the cells that pass ``filter_pass``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .. import data as data_mod
from .. import files, runs, stages
from .. import model as model_mod
from ..stages import Shard
from . import read
from .rank import RankValueTokenizer, TokenizeError, gene_coverage, map_genes, no_genes_error
from .write import LABELS_FILE, OUTPUT, TokenizeResult, tokenize_rows

if TYPE_CHECKING:
    from ..params import Params


def label_mapping(split: pd.DataFrame) -> dict[str, int]:
    """Label -> id over the cells the load stage kept (sorted labels, ids from 0)."""
    labels = sorted(split.loc[split.split != "excluded", "label"].dropna().astype(str).unique())
    return {lab: i for i, lab in enumerate(labels)}


def length_summary(hist: np.ndarray) -> dict[str, float]:
    """min / median / max / mean token count from a histogram of lengths."""
    if hist.sum() == 0:
        return {}
    lens = np.arange(len(hist))
    cdf = np.cumsum(hist)
    return {
        "min": int(lens[hist > 0][0]),
        "median": int(lens[np.searchsorted(cdf, cdf[-1] / 2)]),
        "max": int(lens[hist > 0][-1]),
        "mean": float((hist * lens).sum() / hist.sum()),
    }


def tokenize_stage(params: "Params", run_dir: Path, shard: Shard | None = None) -> dict[str, Any]:
    """Tokenize the cells the load stage kept (one shard of them with ``shard``). Returns the summary."""
    run_dir = Path(run_dir)
    n = params.tokenize.shards
    if shard is None:
        if n > 1:
            raise TokenizeError(
                f"tokenize.shards is {n}: run each shard ({Shard(0, n)} ... {Shard(n - 1, n)}), as the DAG does."
            )
        shard = Shard(0, 1)
    split = data_mod.read_split(run_dir)
    genes = pd.read_csv(run_dir / stages.get("load").output / "genes.csv", index_col=0)
    model_mod.ensure_model_files(params, run_dir)
    paths = model_mod.model_paths(params)
    spec = params.model.spec
    tk = RankValueTokenizer.from_files(
        paths["version_dir"], input_size=spec["input_size"], special_token=spec["special_token"]
    )
    ensembl = map_genes(genes["gene"], params.data.gene_id_type, tk.mapping)
    cov_table, cov = gene_coverage(genes["gene"], ensembl, tk.token_dict, genes["n_cells"].to_numpy())
    if cov["in_vocabulary"] == 0:
        raise no_genes_error(params.data_path.name, params.model.name, cov)
    label_ids = label_mapping(split)
    keep = split[split.split != "excluded"].sort_values("row")
    keep = keep.iloc[slice(*shard.bounds(len(keep)))]

    out_root = run_dir / OUTPUT
    target = out_root / shard.name
    t0 = time.perf_counter()
    if params.tokenize.implementation == "helical":
        ds = _tokenize_with_helical(params, keep, ensembl, label_ids)
        with runs.stage_output(out_root, target.name) as tmp:
            ds.save_to_disk(str(tmp))
        lengths = np.asarray(ds["length"])
        cells, dropped = len(ds), 0
        hist = np.bincount(lengths, minlength=spec["input_size"] + 1)
    else:
        rows = read.passing_rows(params.data_path, keep["row"].to_numpy())
        keep = keep[keep["row"].isin(rows)]
        columns = {
            "cell_id": keep["cell_id"].astype(str).to_numpy(dtype=object),
            "label": keep["label"].astype(str).to_numpy(dtype=object),
            "label_id": keep["label"].astype(str).map(label_ids).to_numpy(dtype=np.int64),
            "split": keep["split"].astype(str).to_numpy(dtype=object),
        }
        res = tokenize_rows(
            params.data_path,
            target,
            tk,
            counts=params.data.counts,
            ensembl_ids=list(ensembl),
            gene_names=list(genes["gene"].astype(str)),
            rows=rows,
            columns=columns,
            n_counts=read.size_factor_column(params.data_path),
            workers=params.tokenize.workers or max(1, int(params.profile_for("tokenize").cpus)),
            chunk_size=params.tokenize.chunk_size,
            dataset_label=params.data_path.name,
            coverage=(cov_table, cov),
        )
        cells, dropped, hist = res.cells, res.dropped_zero_count, res.lengths_hist
    elapsed = time.perf_counter() - t0
    summary = {
        "implementation": params.tokenize.implementation,
        "model": params.model.name,
        "shard": str(shard),
        "cells": int(cells),
        "dropped_zero_count_cells": int(dropped),
        "seconds": elapsed,
        "cells_per_second": cells / elapsed if elapsed > 0 else None,
        "length": length_summary(hist),
        "gene_coverage": cov,
        "labels": label_ids,
    }
    files.write_json(out_root / LABELS_FILE, label_ids)
    with files.atomic(out_root / "gene_coverage.csv") as tmp:
        cov_table.to_csv(tmp, index=False)
    files.write_json(out_root / f"summary.{shard.name}.json", summary)
    return summary


def tokenize_h5ad(
    path: Path,
    out_dir: Path,
    *,
    model_name: str,
    dict_dir: Path,
    label_key: str | None = None,
    gene_names: str = "index",
    gene_id_type: str = "symbol",
    counts: str = "X",
    shard: Shard | None = None,
    workers: int = 1,
    chunk_size: int = 2048,
) -> TokenizeResult:
    """The command-line entry: tokenize a whole h5ad (or one shard of its rows) like helical.

    Writes ``out_dir`` (or, for a shard of several, ``out_dir/shard-0000i-of-0000n``).
    With ``label_key`` the labels are carried as a column of that name: a column with no
    label at all is an error; cells without one are written with a null label and counted
    in :attr:`TokenizeResult.missing_labels` (:func:`data.check_labels` logs the count over the file).
    """
    from ..params import GENEFORMER_MODELS

    if model_name not in GENEFORMER_MODELS:
        raise TokenizeError(f"unknown model {model_name!r}; known: {', '.join(GENEFORMER_MODELS)}")
    spec = GENEFORMER_MODELS[model_name]
    tk = RankValueTokenizer.from_files(dict_dir, input_size=spec["input_size"], special_token=spec["special_token"])
    path = Path(path)
    data_mod.open_h5(path).close()  # clear errors for missing/truncated/non-h5ad files, without reading obs/var
    names = read.read_gene_names(path, counts, gene_names)
    ensembl = map_genes(pd.Series(names), gene_id_type, tk.mapping)
    if read.n_obs(path) == 0:
        raise TokenizeError(f"{path} has no cells.")
    rows = read.passing_rows(path)
    if label_key:
        read.check_label_column(path, label_key, rows)
    if shard is not None:
        rows = rows[slice(*shard.bounds(len(rows)))]
    # per-cell columns are read chunk by chunk in the workers
    columns: dict[str, np.ndarray | str] = {"cell_id": data_mod.ObsColumns.NAMES}
    if label_key:
        columns[label_key] = label_key
    target = Path(out_dir) / shard.name if shard is not None and shard.n > 1 else Path(out_dir)
    return tokenize_rows(
        path,
        target,
        tk,
        counts=counts,
        ensembl_ids=list(ensembl),
        gene_names=list(names),
        rows=rows,
        columns=columns,
        n_counts=read.size_factor_column(path),
        workers=workers,
        chunk_size=chunk_size,
        dataset_label=path.name,
        label=label_key or None,
    )


def _tokenize_with_helical(params: "Params", keep: pd.DataFrame, ensembl: pd.Series, label_ids: dict[str, int]):
    """helical's TranscriptomeTokenizer on the kept cells, held in memory (the reference).

    ``n_counts`` and ``filter_pass`` are handed to helical as obs columns: helical applies
    its own rules for them, which is what the streaming path is checked against.
    """
    import anndata
    import scipy.sparse as sp
    from helical.models.geneformer.geneformer_tokenizer import TranscriptomeTokenizer

    paths = model_mod.model_paths(params)
    rows = keep["row"].to_numpy()
    with data_mod.CountsReader(params.data_path, params.data.counts) as r:
        X = r.rows(int(rows.min()), int(rows.max()) + 1, dense_ok=True)[rows - rows.min()]
    X = X if isinstance(X, np.ndarray) else sp.csr_matrix(X)
    obs_cols = read.read_obs_full(params.data_path, [read.N_COUNTS, read.FILTER_PASS])
    obs = pd.DataFrame(
        {
            "cell_id": keep["cell_id"].astype(str).values,
            "label": keep["label"].astype(str).values,
            "label_id": [label_ids[lab] for lab in keep["label"].astype(str)],
            "split": keep["split"].values,
        }
    )
    for c, v in obs_cols.items():
        obs[c] = v[rows]
    obs.index = obs["cell_id"].values
    var = pd.DataFrame({"ensembl_id": list(ensembl)}, index=pd.Index([f"g{i}" for i in range(len(ensembl))]))
    adata = anndata.AnnData(X=X, obs=obs, var=var)
    tk = TranscriptomeTokenizer(
        custom_attr_name_dict={"cell_id": "cell_id", "label": "label", "label_id": "label_id", "split": "split"},
        nproc=1,
        chunk_size=512,
        model_input_size=params.model.spec["input_size"],
        special_token=params.model.spec["special_token"],
        gene_median_file=paths["gene_median_path"],
        token_dictionary_file=paths["token_path"],
        gene_mapping_file=paths["ensembl_dict_path"],
    )
    cells, meta = tk.tokenize_anndata(adata)
    return tk.create_dataset(cells, meta, use_generator=False)
