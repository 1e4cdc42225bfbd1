"""Reading an ``.h5ad`` for tokenization: genes, the cells to tokenize, their obs columns, counts.

Everything is read straight from the HDF5 file, never the whole matrix, and per-cell obs
columns chunk by chunk (:class:`data.ObsColumns`), so memory stays flat whatever the number
of cells. What helical does with ``obs``, and so what we do:

* ``filter_pass`` (when the column exists) keeps the cells whose value is 1
  (:func:`passing_rows`: the one place that rule is written);
* ``n_counts`` (when the column exists) is each cell's size factor (:func:`size_factor_column`);
* the label column is carried as it is; a cell with no label (see :func:`data.missing_labels`)
  gets a null label, and a column with no label at all is an error (:func:`check_label_column`).

:func:`read_tokens` reads one chunk of rows and rank-encodes it: the compiled path on raw
CSR arrays where it applies, else a CSR or dense block through the general path, with the
values checked (negative or non-finite counts are an error naming the fix).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .. import data as data_mod
from .rank import GenePlan, RankValueTokenizer, TokenizeError

FILTER_PASS = "filter_pass"
N_COUNTS = "n_counts"
_OBS_CHUNK = 1 << 16  # rows of an obs column read at a time by whole-column passes


def n_obs(path: Path) -> int:
    with data_mod.ObsColumns(Path(path), []) as obs:
        return obs.n_obs


def passing_rows(path: Path, rows: np.ndarray | None = None) -> np.ndarray:
    """The rows helical tokenizes: all rows (or ``rows``), less those whose ``filter_pass`` is not 1.

    helical's rule (``TranscriptomeTokenizer.tokenize_anndata``): when obs has a
    ``filter_pass`` column, only cells with ``filter_pass == 1`` are tokenized.
    """
    path = Path(path)
    have = FILTER_PASS in data_mod.obs_keys(path)
    with data_mod.ObsColumns(path, [FILTER_PASS] if have else []) as obs:
        rows = np.arange(obs.n_obs) if rows is None else np.asarray(rows)
        if not have:
            return rows
        values = obs.read(FILTER_PASS, 0, obs.n_obs)
    return rows[np.asarray(values[rows] == 1, dtype=bool)]


def size_factor_column(path: Path) -> str | None:
    """The obs column helical takes each cell's size factor from, if the file has it (else the row sums)."""
    return N_COUNTS if N_COUNTS in data_mod.obs_keys(Path(path)) else None


def read_obs_full(path: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Those of ``names`` that are obs columns, read whole (small per-cell columns only)."""
    stored = data_mod.obs_keys(path)
    have = [n for n in names if n in stored]
    with data_mod.ObsColumns(path, have) as obs:
        return {n: obs.read(n, 0, obs.n_obs) for n in have}


def read_gene_names(path: Path, counts: str, gene_names: str) -> np.ndarray:
    """The matrix's gene names: the var index (``'index'``) or a var column (of ``raw/var`` for raw counts)."""
    import h5py
    from anndata.io import read_elem

    with h5py.File(path, "r") as f:
        var = read_elem(f["raw/var"] if counts == "raw" else f["var"])
    if gene_names == "index":
        return np.asarray(var.index.astype(str))
    if gene_names not in var.columns:
        raise TokenizeError(
            f"gene names column {gene_names!r} is not in var (columns: "
            f"{', '.join(map(str, var.columns)) or 'none'}). "
            "Fix: name one of them, or 'index' for the var names."
        )
    return np.asarray(var[gene_names].astype(str))


def check_label_column(path: Path, key: str, rows: np.ndarray) -> int:
    """The cells among ``rows`` whose ``key`` label is missing, counted by :func:`data.check_labels`
    (an error when every one is; logged when some are). Reads the column chunk by chunk."""
    path = Path(path)
    have = data_mod.obs_keys(path)
    if key not in have:
        raise TokenizeError(
            f"label column {key!r} is not in obs (columns: {', '.join(have) or 'none'}). "
            "Fix: pass --label-key with one of them."
        )
    with data_mod.ObsColumns(path, [key]) as obs:
        missing = np.zeros(obs.n_obs, dtype=bool)
        for a in range(0, obs.n_obs, _OBS_CHUNK):
            b = min(a + _OBS_CHUNK, obs.n_obs)
            missing[a:b] = data_mod.missing_labels(obs.read(key, a, b))
    return data_mod.check_labels(
        key, missing[rows], dataset=path.name, fix="pass --label-key with a labelled column (or none)"
    )


# ------------------------------------------------------------------ counts -> tokens ----


def read_tokens(
    reader: data_mod.CountsReader,
    rows: np.ndarray,
    n_counts: np.ndarray | None,
    tokenizer: RankValueTokenizer,
    plan: GenePlan,
    work: dict[str, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens of the (sorted) ``rows``: (flat tokens, offsets, kept mask), as :meth:`RankValueTokenizer.encode_block`.

    Reads the range ``rows[0] .. rows[-1]``; rows left out inside it (``filter_pass``) are
    read but not encoded. The compiled CSR path where it applies, else the general one.
    """
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    if reader.sparse and plan.groups is None:
        indptr, indices, data = reader.csr_arrays(lo, hi, work)
        selected, nc_range = None, n_counts
        if hi - lo != len(rows):  # rows left out inside the range: read, not encoded
            selected = np.zeros(hi - lo, dtype=bool)
            selected[rows - lo] = True
            if n_counts is not None:
                nc_range = np.zeros(hi - lo, dtype=n_counts.dtype)
                nc_range[rows - lo] = n_counts
        try:
            out = tokenizer.encode_csr(indptr, indices, data, plan, reader.shape[1], nc_range, selected, work)
        except ValueError as e:
            raise _bad_values(str(e), reader, lo) from None
        if out is not None:
            return out
    block = reader.rows(lo, hi, dense_ok=True)
    if hi - lo != len(rows):
        block = block[rows - lo]
    _check_values(block, reader, lo)
    return tokenizer.encode_block(block, plan, n_counts)


def _bad_values(kind: str, reader: data_mod.CountsReader, first_row: int) -> TokenizeError:
    if kind == "negative":
        return TokenizeError(
            f"{reader.path}: counts at '{reader.source}' contain negative values (rows from "
            f"{first_row}); this looks like scaled data. "
            "Fix: point at raw counts (X, raw or a layer)."
        )
    return TokenizeError(
        f"{reader.path}: counts at '{reader.source}' contain NaN or infinite values (rows from "
        f"{first_row}). Fix: use raw counts or clean the matrix."
    )


def _check_values(block, reader: data_mod.CountsReader, first_row: int) -> None:
    import scipy.sparse as sp

    data = block.data if sp.issparse(block) else np.asarray(block)
    if data.size == 0:
        return
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise _bad_values("not finite", reader, first_row)
    if data.min() < 0:
        raise _bad_values("negative", reader, first_row)
