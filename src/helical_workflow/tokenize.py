"""Geneformer tokenization: counts -> rank-value tokens, streamed from a backed ``.h5ad``.

Two implementations, chosen by ``tokenize.implementation``:

* ``streaming`` (default): :class:`RankValueTokenizer` reads row chunks straight from the
  HDF5 file (CSR or dense; ``X``, ``raw`` or a layer), normalises and rank-encodes them,
  and appends them to Arrow files (Hugging Face ``datasets`` format) as it goes: memory
  stays flat whatever the number of cells (per-cell obs columns are read chunk by chunk
  too). CSR chunks take a compiled path (``_rank_kernel``: cells whose values are all
  distinct are ranked by sorting packed keys; cells with ties by ``np.argsort``, as
  helical); dense, collapsed or unusual matrices the vectorised numpy path
  (:meth:`RankValueTokenizer.encode_block`). Row ranges can be split into shards (one
  Airflow task each) and, within a shard, over forked worker processes.
* ``helical``: helical's own ``TranscriptomeTokenizer`` (what ``Geneformer.process_data``
  runs after mapping genes), on the selected cells held in memory: the reference.

The streaming tokenizer produces exactly helical's tokens. The semantics it copies:

* a cell's size factor is ``obs["n_counts"]`` when that column exists, else the sum of
  its counts over *all* genes of the matrix; values are ``(x / n) * 10000 / median``,
  computed with the same numpy dtypes as helical, so ties break identically;
* genes whose ``ensembl_id`` is a key of the token dictionary are used, in matrix column
  order; genes are ranked by ``np.argsort(-value)`` (numpy's default sort, as helical);
* ``filter_pass`` (when present) keeps cells whose value is 1;
* truncation to the model input size; ``<cls>`` ... ``<eos>`` for models with special
  tokens (v2/v3), none for v1;
* duplicate Ensembl ids: helical collapses genes only when *different* ids map to the same
  id through the Ensembl mapping dictionary. A dataset that simply repeats an id is not
  collapsed: each column keeps its own token (so a token can appear twice), exactly as in
  helical. When different ids do map to one id, helical 2.2.0 raises ``KeyError:
  'ensembl_id'``; we collapse as the original Geneformer does (counts summed per mapped
  id, size factor over mapped genes) instead of failing.

Documented differences: cells with zero total counts are dropped and counted in the
summary (helical emits an empty cell for a sparse matrix, and every gene in an arbitrary
order of NaNs for a dense one);
``input_ids`` are stored as uint16 when every token id fits (Geneformer's vocabularies
do; half the bytes of int32 on disk), else int32 (helical: int64; same values).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
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
TARGET_SUM = 10_000


class TokenizeError(ValueError):
    pass


shard_name = runs.shard_name


def parse_shard(text: str | None) -> tuple[int, int]:
    """'I/N' (0-based I) -> (I, N), as a TokenizeError when malformed."""
    try:
        return runs.parse_shard(text)
    except ValueError as e:
        raise TokenizeError(str(e)) from None


def shard_rows(rows: np.ndarray, i: int, n: int) -> np.ndarray:
    """The i-th of n contiguous, near-equal slices of ``rows``."""
    bounds = np.linspace(0, len(rows), n + 1).round().astype(int)
    return rows[bounds[i] : bounds[i + 1]]


# ------------------------------------------------------------------ gene mapping ----

def map_genes(names: pd.Series, gene_id_type: str, mapping: dict[str, str]) -> pd.Series:
    """Gene names -> Ensembl ids through the model's Ensembl mapping dictionary.

    Symbols are looked up upper-cased (the dictionary holds symbols and ids as keys);
    with ``gene_id_type: ensembl`` the names are used as they are. Unmapped genes are None.
    """
    names = pd.Series(names).astype(str).reset_index(drop=True)
    if gene_id_type == "ensembl":
        return names.where(names.str.len() > 0, None)
    mapped = names.str.upper().map(mapping)
    return mapped.astype(object).where(mapped.notna(), None)


def gene_coverage(names: Sequence[str], ensembl: Sequence[str | None], token_dict: dict[str, int],
                  n_cells: np.ndarray | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """How many of the dataset's genes map to tokens, and which do not."""
    df = pd.DataFrame({"gene": pd.Series(names).astype(str).values, "ensembl_id": list(ensembl)})
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


def no_genes_error(dataset: str, model: str, cov: dict[str, Any]) -> TokenizeError:
    return TokenizeError(
        f"none of the {cov['genes']} genes of {dataset} map to tokens of model {model} "
        f"(mapped to Ensembl: {cov['mapped_to_ensembl']}, in vocabulary: 0; examples: "
        f"{', '.join(cov['unmapped_examples'][:5])}). Fix: check the gene names column (data.gene_names / "
        "--gene-names) and the id type (symbol or ensembl), and that the model's dictionaries are for this species."
    )


# ------------------------------------------------------------------ the tokenizer ----

@dataclass
class GenePlan:
    """Which matrix columns become which tokens (helical's gene selection, precomputed)."""

    cols: np.ndarray            # matrix columns used, ascending
    tokens: np.ndarray          # token of each used column (int32)
    medians: np.ndarray         # gene median of each used column (float64)
    groups: np.ndarray | None = None   # collapse path: output slot of each used column
    count_cols: np.ndarray | None = None  # collapse path: columns whose counts make the size factor
    _colmap: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.recip_medians = np.true_divide(1.0, self.medians)  # helical divides sparse by dense: x * (1/m)

    def column_map(self, n_genes: int) -> np.ndarray:
        if self._colmap is None or len(self._colmap) != n_genes:
            self._colmap = _column_map(self.cols, n_genes)
        return self._colmap


class RankValueTokenizer:
    """Geneformer's rank-value encoding, token-identical to helical's TranscriptomeTokenizer."""

    def __init__(self, token_dict: dict[str, int], median_dict: dict[str, float], mapping_dict: dict[str, str] | None,
                 *, input_size: int, special_token: bool):
        self.token_dict = token_dict
        self.median_dict = median_dict
        keys = set(token_dict)
        mapping = mapping_dict if mapping_dict is not None else {k: k for k in token_dict}
        self.mapping = {k: v for k, v in mapping.items() if v in keys}  # as helical filters it
        self.input_size = input_size
        self.special_token = special_token
        if special_token and ("<cls>" not in token_dict or "<eos>" not in token_dict):
            raise TokenizeError("this model uses <cls>/<eos> tokens but the token dictionary has none. "
                                "Fix: use the dictionaries of the model's version (v2/v3).")
        self.cls = token_dict.get("<cls>")
        self.eos = token_dict.get("<eos>")
        # how input_ids are stored: uint16 where every token fits (half the bytes of int32)
        self.token_dtype = np.dtype(np.uint16 if max(token_dict.values(), default=0) < 1 << 16 else np.int32)

    @classmethod
    def from_files(cls, dict_dir: Path, *, input_size: int, special_token: bool) -> "RankValueTokenizer":
        import pickle

        dict_dir = Path(dict_dir)
        loaded = {}
        for name in model_mod.DICTIONARIES:
            p = dict_dir / name
            if not p.is_file():
                raise TokenizeError(f"{p} is missing. Fix: point --model-dir at the folder with "
                                    f"{', '.join(model_mod.DICTIONARIES)} for this model version.")
            with open(p, "rb") as f:
                loaded[name] = pickle.load(f)
        return cls(loaded["token_dictionary.pkl"], loaded["gene_median_dictionary.pkl"],
                   loaded["ensembl_mapping_dict.pkl"], input_size=input_size, special_token=special_token)

    def plan(self, ensembl_ids: Sequence[str | None]) -> GenePlan:
        ids = list(ensembl_ids)
        in_map = [g for g in ids if g is not None and g in self.mapping]
        if len(set(in_map)) == len({self.mapping[g] for g in in_map}):
            # helical: no collapse; genes keyed by their own ensembl_id
            cols = np.array([j for j, g in enumerate(ids) if g is not None and g in self.token_dict], dtype=np.int64)
            used = [ids[j] for j in cols]
            self._check_medians(used)
            return GenePlan(cols=cols, tokens=np.array([self.token_dict[g] for g in used], dtype=np.int32),
                            medians=np.array([self.median_dict[g] for g in used], dtype=np.float64))
        # collapse (original Geneformer semantics; helical 2.2.0 raises KeyError here)
        collapsed = [self.mapping.get(str(g).upper()) if g is not None else None for g in ids]
        count_cols = np.array([j for j, c in enumerate(collapsed) if c is not None], dtype=np.int64)
        slots: dict[str, int] = {}
        for j in count_cols:
            slots.setdefault(collapsed[j], len(slots))
        order = list(slots)
        self._check_medians(order)
        return GenePlan(cols=count_cols, tokens=np.array([self.token_dict[g] for g in order], dtype=np.int32),
                        medians=np.array([self.median_dict[g] for g in order], dtype=np.float64),
                        groups=np.array([slots[collapsed[j]] for j in count_cols], dtype=np.int64),
                        count_cols=count_cols)

    def _check_medians(self, genes: Sequence[str]) -> None:
        missing = [g for g in genes if g not in self.median_dict]
        if missing:
            raise TokenizeError(f"{len(missing)} genes of the token dictionary have no gene median "
                                f"(e.g. {missing[:3]}). Fix: use the gene median dictionary of the same model version.")

    def encode_block(self, block, plan: GenePlan, n_counts: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokenize a block of cells (rows; CSR or dense over all genes of the matrix).

        Returns (flat int32 tokens, int64 offsets of len kept+1, bool mask of cells kept);
        :meth:`encode_csr` returns its tokens in ``token_dtype``.
        The arithmetic follows helical's expression ``(X / n_counts) * 10000 / medians``
        exactly as numpy and scipy evaluate it, so values, and therefore ties, are bitwise
        the same: a sparse matrix divided by a dense array is multiplied by the reciprocal.
        """
        import scipy.sparse as sp

        if plan.groups is not None:
            block = self._collapse(block, plan)
            cols = np.arange(len(plan.tokens))
        else:
            cols = plan.cols
        if n_counts is None:
            # helical: X.sum(axis=1) over all genes, same dtype and summation order
            # (collapse path: over the mapped genes, as the original Geneformer)
            n = np.asarray(block.sum(axis=1)).reshape(-1)
        else:
            n = np.asarray(n_counts).reshape(-1)
        keep_cell = n > 0
        if sp.issparse(block):
            indptr, ind, data = self._select_columns(block, cols, plan)
            with np.errstate(divide="ignore"):
                recip = np.true_divide(1.0, n)  # zero-count cells: inf, dropped below
            vals = np.multiply(data, np.repeat(recip, np.diff(indptr))) * TARGET_SUM
            vals = np.multiply(vals, plan.recip_medians[ind])
            return self._rank_rows(vals, ind, indptr, keep_cell, plan.tokens)
        dense = np.asarray(block)[:, cols]
        with np.errstate(divide="ignore", invalid="ignore"):
            norm = (dense / n.reshape(-1, 1)) * TARGET_SUM / plan.medians.reshape(1, -1)
        sel = sp.csr_matrix(norm)  # drops exact zeros, as helical's csr_matrix(X_norm)
        return self._rank_rows(sel.data, sel.indices, sel.indptr, keep_cell, plan.tokens)

    def encode_csr(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, plan: GenePlan, n_genes: int,
                   n_counts: np.ndarray | None = None, selected: np.ndarray | None = None,
                   work: dict[str, np.ndarray] | None = None):
        """The compiled fast path of :meth:`encode_block` for raw CSR arrays (rows over all ``n_genes``).

        Same tokens as ``encode_block``: keys sort the cells whose values are distinct, and
        ``np.argsort`` ranks the cells with ties (see ``_rank_kernel``). ``selected`` masks
        the rows to encode (others are skipped, not counted); ``n_counts`` is aligned with
        all rows. Returns (flat tokens, offsets, kept-of-selected mask), views of ``work``
        buffers valid until the next call; or None where only the general path applies
        (collapse, indices not sorted within rows, dtypes other than float32/float64 work).
        """
        import scipy.sparse as sp

        from . import _rank_kernel as K

        if plan.groups is not None:
            return None
        tie_heavy, probed, probed_ties = False, 0, 0
        n_rows = len(indptr) - 1
        if n_counts is None:  # helical's X.sum(axis=1): scipy's own, on the same arrays (no copy)
            n = np.asarray(sp.csr_matrix((data, indices, indptr), shape=(n_rows, n_genes), copy=False).sum(axis=1))
            n = n.reshape(-1)
        else:
            n = np.asarray(n_counts).reshape(-1)
        with np.errstate(divide="ignore"):
            recip = np.true_divide(1.0, n)
        wtype = np.result_type(data.dtype, recip.dtype)
        if wtype not in (np.float32, np.float64):
            return None
        keep = n > 0
        row_ok = keep if selected is None else keep & selected
        check = np.ones(n_rows, dtype=bool) if selected is None else selected
        work = {} if work is None else work
        x, recip = data.astype(wtype, copy=False), recip.astype(wtype, copy=False)
        colmap, tsum = plan.column_map(n_genes), wtype.type(TARGET_SUM)
        limit = self.input_size - 2 if self.special_token else self.input_size
        special = self.special_token
        cls_, eos_ = (self.cls, self.eos) if special else (0, 0)
        n_keep = int(row_ok.sum())
        flat = data_mod.reusable_buffer(work, "flat", len(data) + 2 * n_keep, self.token_dtype)
        offsets = np.zeros(n_keep + 1, dtype=np.int64)
        at = k = 0
        # sub-blocks of rows small enough that keys, values and tokens stay in cache between passes
        for r0 in range(0, n_rows, _SUB_ROWS):
            r1 = min(r0 + _SUB_ROWS, n_rows)
            ok = row_ok[r0:r1]
            if not check[r0:r1].any():
                continue
            nnz = int(indptr[r1] - indptr[r0])
            keys, neg, toks, order = (data_mod.reusable_buffer(work, name, nnz, dt) for name, dt in
                                      (("keys", np.uint32), ("neg", np.float64), ("toks", np.int32), ("order", np.int32)))
            out_ptr = data_mod.reusable_buffer(work, "out_ptr", r1 - r0 + 1, np.int64)
            tied = data_mod.reusable_buffer(work, "tied", r1 - r0, np.bool_)
            scratch = data_mod.reusable_buffer(work, "scratch", n_genes, np.int32)
            status = K.prepare(indptr[r0 : r1 + 1], indices, x, recip[r0:r1], tsum, colmap, plan.recip_medians,
                               plan.tokens, check[r0:r1], ok, keys, neg, toks, out_ptr, tied)
            if status == K.UNSORTED:
                return None
            if status != K.OK:
                raise ValueError("negative" if status == K.NEGATIVE else "not finite")
            rows = np.flatnonzero(ok)
            if tie_heavy:
                tied[rows] = True
            elif len(rows):
                _sort_rows(keys, out_ptr, rows)
                ties = K.resolve(keys, neg, out_ptr, rows, tied, order, scratch)
                if probed < _PROBE_ROWS:  # the first rows decide: ties in most -> argsort every row directly
                    probed, probed_ties = probed + len(rows), probed_ties + ties
                    tie_heavy = probed >= _PROBE_ROWS and 2 * probed_ties > probed
            bounds = out_ptr.tolist()
            for r in np.flatnonzero(tied & ok).tolist():
                s, e = bounds[r], bounds[r + 1]
                order[s:e] = neg[s:e].argsort()  # np.argsort(-value) as helical: same array, same order
            at = K.emit(order, toks, out_ptr, ok, limit, special, cls_, eos_, flat, offsets, at, k)
            k += int(ok.sum())
        kept = keep if selected is None else keep[selected]
        return flat[:at], offsets, kept

    @staticmethod
    def _collapse(block, plan: GenePlan):
        """Sum the columns that map to the same Ensembl id (collapse path)."""
        import scipy.sparse as sp

        m = sp.csr_matrix((np.ones(len(plan.cols)), (np.arange(len(plan.cols)), plan.groups)),
                          shape=(len(plan.cols), len(plan.tokens)))
        sub = block[:, plan.cols]
        out = sub @ m
        return out.tocsr() if sp.issparse(out) else np.asarray(out)

    @staticmethod
    def _select_columns(block, cols: np.ndarray, plan: "GenePlan"):
        """CSR column selection (ascending ``cols``), vectorised: (indptr, positions in cols, data).

        Same entries in the same order as ``block[:, cols]``, without scipy's per-row work.
        """
        block.sort_indices()
        n_rows = block.shape[0]
        colmap = plan.column_map(block.shape[1]) if cols is plan.cols else _column_map(cols, block.shape[1])
        pos = colmap[block.indices]
        if len(cols) == block.shape[1] or pos.min(initial=0) >= 0:  # every stored gene is used
            return block.indptr.astype(np.int64), pos, block.data
        m = pos >= 0
        csum = np.zeros(len(m) + 1, dtype=np.int64)
        np.cumsum(m, out=csum[1:])
        indptr = csum[block.indptr]
        del csum
        return indptr, pos[m], block.data[m]

    def _rank_rows(self, vals, cols, indptr, keep_cell, tokens):
        """Rank each cell's genes by ``np.argsort(-value)`` (as helical), truncate, add special tokens."""
        limit = self.input_size - 2 if self.special_token else self.input_size
        neg = -vals
        del vals
        tok = tokens[cols]  # token of every stored value, int32
        argsort = np.argsort
        special = self.special_token
        n_keep = int(keep_cell.sum())
        flat = np.empty(len(tok) + (2 * n_keep if special else 0), dtype=np.int32)
        offsets = np.zeros(n_keep + 1, dtype=np.int64)
        bounds = indptr.tolist()
        at = k = 0
        cls_, eos_ = self.cls, self.eos
        for r, keep in enumerate(keep_cell.tolist()):
            if not keep:
                continue
            s, e = bounds[r], bounds[r + 1]
            o = argsort(neg[s:e])
            if e - s > limit:
                o = o[:limit]
            n = len(o)
            if special:
                flat[at] = cls_
                flat[at + 1 : at + 1 + n] = tok[s:e][o]
                flat[at + 1 + n] = eos_
                at += n + 2
            else:
                flat[at : at + n] = tok[s:e][o]
                at += n
            k += 1
            offsets[k] = at
        return flat[:at], offsets, keep_cell


_PROBE_ROWS = 64  # cells per block whose keys are sorted before deciding whether the block is tie-heavy
_SUB_ROWS = 32  # cells encoded together by the compiled passes


def _sort_rows(keys: np.ndarray, out_ptr: np.ndarray, rows: np.ndarray) -> None:
    """Sort each row's keys in place (numpy's SIMD sort)."""
    for s, e in zip(out_ptr[rows].tolist(), out_ptr[rows + 1].tolist()):
        keys[s:e].sort()


def _column_map(cols: np.ndarray, n_genes: int) -> np.ndarray:
    m = np.full(n_genes, -1, dtype=np.int32)
    m[cols] = np.arange(len(cols), dtype=np.int32)
    return m


# ------------------------------------------------------------- writing Arrow shards ----

def _features(extra: dict[str, str], token_dtype: np.dtype):
    from datasets import Features, Sequence, Value

    f = {"input_ids": Sequence(Value(np.dtype(token_dtype).name)), "length": Value("int32")}
    f.update({k: Value(v) for k, v in extra.items()})
    return Features(f)


def _arrow_type(values: np.ndarray | list) -> str:
    arr = np.asarray(values)
    if arr.dtype.kind in "iu":
        return "int64"
    if arr.dtype.kind == "f":
        return "float64"
    if arr.dtype.kind == "b":
        return "bool"
    return "string"


def write_dataset_dir(out: Path, arrow_files: list[Path], features) -> None:
    """Finish a ``datasets`` folder (what ``save_to_disk`` writes) around existing Arrow files."""
    from datasets import DatasetInfo

    n = len(arrow_files)
    files = []
    for k, src in enumerate(arrow_files):
        name = f"data-{k:05d}-of-{n:05d}.arrow"
        if src.name != name or src.parent != out:
            os.replace(src, out / name)
        files.append({"filename": name})
    DatasetInfo(features=features).write_to_directory(str(out))
    state = {"_data_files": files, "_fingerprint": secrets.token_hex(8), "_format_columns": None,
             "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
    (out / "state.json").write_text(json.dumps(state, indent=2))


@dataclass
class TokenizeJob:
    """One contiguous piece of work: rows of a file -> one Arrow file."""

    path: str
    counts: str
    rows: np.ndarray                     # sorted matrix rows to tokenize
    plan: GenePlan
    tokenizer: RankValueTokenizer
    columns: dict[str, np.ndarray | str]  # per-row metadata aligned with ``rows``, or the obs column to read
    n_counts: np.ndarray | str | None    # obs n_counts aligned with ``rows``, or its obs column, or None
    out_file: str
    features: Any
    chunk_size: int = 2048


def _run_job(job: TokenizeJob) -> dict[str, Any]:
    import pyarrow as pa

    rows = job.rows
    cells = dropped = 0
    chunk = job.chunk_size
    schema = job.features.arrow_schema
    lazy = sorted({c for c in [*job.columns.values(), job.n_counts] if isinstance(c, str)})
    lengths_hist = np.zeros(job.tokenizer.input_size + 1, dtype=np.int64)
    work: dict[str, np.ndarray] = {}  # buffers reused from chunk to chunk
    with (data_mod.CountsReader(Path(job.path), job.counts) as reader,
          data_mod.ObsColumns(Path(job.path), lazy) as obs,
          pa.OSFile(job.out_file, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer):
        if not reader.sparse:  # a dense block is rows x genes: keep it around 128 MB
            chunk = max(1, min(chunk, (1 << 24) // max(reader.shape[1], 1)))
        for a in range(0, len(rows), chunk):
            rsel = rows[a : a + chunk]
            lo, hi = int(rsel[0]), int(rsel[-1]) + 1

            def column(c):
                if isinstance(c, str):
                    v = obs.read(c, lo, hi)
                    return v if hi - lo == len(rsel) else v[rsel - lo]
                return c[a : a + len(rsel)]

            nc = None if job.n_counts is None else column(job.n_counts)
            flat, offsets, kept = _encode_rows(job, reader, rsel, nc, work)
            lengths = np.diff(offsets).astype(np.int32)
            ids = pa.array(flat.astype(job.tokenizer.token_dtype, copy=False))
            arrays = [pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), ids), pa.array(lengths)]
            for name, c in job.columns.items():
                arrays.append(_arrow_column(column(c)[kept], schema.field(name).type))
            writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
            cells += int(kept.sum())
            dropped += int((~kept).sum())
            lengths_hist += np.bincount(lengths, minlength=len(lengths_hist))
    return {"cells": cells, "dropped_zero_count": dropped, "lengths_hist": lengths_hist}


def _arrow_column(values: np.ndarray, typ):
    import pyarrow as pa

    if pa.types.is_string(typ) and values.dtype.kind != "U":
        values = values.astype(str)  # a missing category (NaN) becomes 'nan', as pandas' astype(str)
    elif values.dtype == object and not pa.types.is_string(typ):
        values = values.tolist()
    return pa.array(values, type=typ)


def _encode_rows(job: TokenizeJob, reader: "data_mod.CountsReader", rsel: np.ndarray, nc: np.ndarray | None,
                 work: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens of the (sorted) rows ``rsel``: the compiled CSR path, else the general one."""
    lo, hi = int(rsel[0]), int(rsel[-1]) + 1
    if reader.sparse and job.plan.groups is None:
        indptr, indices, data = reader.csr_arrays(lo, hi, work)
        selected, nc_range = None, nc
        if hi - lo != len(rsel):  # rows left out (filter_pass) inside the range: read, not encoded
            selected = np.zeros(hi - lo, dtype=bool)
            selected[rsel - lo] = True
            if nc is not None:
                nc_range = np.zeros(hi - lo, dtype=nc.dtype)
                nc_range[rsel - lo] = nc
        try:
            out = job.tokenizer.encode_csr(indptr, indices, data, job.plan, reader.shape[1], nc_range, selected, work)
        except ValueError as e:
            raise _bad_values(str(e), job.path, job.counts, lo) from None
        if out is not None:
            return out
    block = reader.rows(lo, hi, dense_ok=True)
    if hi - lo != len(rsel):
        block = block[rsel - lo]
    _check_values(block, job.path, job.counts, lo)
    return job.tokenizer.encode_block(block, job.plan, nc)


def _bad_values(kind: str, path: str, source: str, first_row: int) -> TokenizeError:
    if kind == "negative":
        return TokenizeError(f"{path}: counts at '{source}' contain negative values (rows from {first_row}); "
                             "this looks like scaled data. Fix: point at raw counts (X, raw or a layer).")
    return TokenizeError(f"{path}: counts at '{source}' contain NaN or infinite values (rows from {first_row}). "
                         "Fix: use raw counts or clean the matrix.")


def _check_values(block, path: str, source: str, first_row: int) -> None:
    import scipy.sparse as sp

    data = block.data if sp.issparse(block) else np.asarray(block)
    if data.size == 0:
        return
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise _bad_values("not finite", path, source, first_row)
    if data.min() < 0:
        raise _bad_values("negative", path, source, first_row)


@dataclass
class TokenizeResult:
    out_dir: Path
    cells: int
    dropped_zero_count: int
    seconds: float
    lengths_hist: np.ndarray
    coverage: dict[str, Any]
    coverage_table: pd.DataFrame

    @property
    def cells_per_second(self) -> float:
        return self.cells / self.seconds if self.seconds > 0 else float("nan")

    def length_summary(self) -> dict[str, float]:
        return length_summary(self.lengths_hist)


def length_summary(hist: np.ndarray) -> dict[str, float]:
    """min / median / max / mean token count from a histogram of lengths."""
    if hist.sum() == 0:
        return {}
    lens = np.arange(len(hist))
    cdf = np.cumsum(hist)
    return {"min": int(lens[hist > 0][0]), "median": int(lens[np.searchsorted(cdf, cdf[-1] / 2)]),
            "max": int(lens[hist > 0][-1]), "mean": float((hist * lens).sum() / hist.sum())}


_FORKED_JOBS: list[TokenizeJob] = []


def _run_forked_job(k: int) -> dict[str, Any]:
    return _run_job(_FORKED_JOBS[k])


def tokenize_rows(path: Path, out_dir: Path, tokenizer: RankValueTokenizer, *, counts: str, ensembl_ids: Sequence,
                  gene_names: Sequence[str], rows: np.ndarray, columns: dict[str, np.ndarray | str],
                  n_counts: np.ndarray | str | None, workers: int = 1, chunk_size: int = 2048,
                  dataset_label: str | None = None,
                  coverage: tuple[pd.DataFrame, dict[str, Any]] | None = None) -> TokenizeResult:
    """Tokenize ``rows`` of an h5ad into one ``datasets`` folder ``out_dir`` (written atomically).

    ``columns`` are per-row metadata (cell ids, labels, ...): arrays aligned with ``rows``,
    or the name of an obs column (:attr:`data.ObsColumns.NAMES` for obs_names), read chunk by
    chunk; ``n_counts`` likewise. Rows are split over ``workers`` processes, each writing
    one Arrow file of the dataset. ``coverage``: the gene coverage when the caller has it already.
    """
    t0 = time.perf_counter()
    cov_table, cov = coverage or gene_coverage(gene_names, ensembl_ids, tokenizer.token_dict)
    if cov["in_vocabulary"] == 0:
        raise no_genes_error(dataset_label or Path(path).name, "this model", cov)
    plan = tokenizer.plan(ensembl_ids)
    lazy = [v for v in columns.values() if isinstance(v, str)]
    with data_mod.ObsColumns(Path(path), lazy) as obs:  # a column read from the file: typed by its first row
        extra = {k: _arrow_type(obs.read(v, 0, 1) if isinstance(v, str) else v) for k, v in columns.items()}
    features = _features(extra, tokenizer.token_dtype)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(workers, -(-len(rows) // max(chunk_size, 1))))  # no more workers than chunks
    bounds = np.linspace(0, len(rows), workers + 1).round().astype(int)
    with runs.stage_output(out_dir.parent, out_dir.name) as tmp:  # renamed into place only when complete
        def part(v, k):
            return v if v is None or isinstance(v, str) else np.asarray(v)[bounds[k] : bounds[k + 1]]

        jobs = [
            TokenizeJob(path=str(path), counts=counts, rows=rows[bounds[k]:bounds[k + 1]], plan=plan,
                        tokenizer=tokenizer, columns={c: part(v, k) for c, v in columns.items()},
                        n_counts=part(n_counts, k), out_file=str(tmp / f"part-{k:05d}.arrow"), features=features,
                        chunk_size=chunk_size)
            for k in range(workers)
        ]
        if len(jobs) == 1:
            results = [_run_job(jobs[0])]
        else:
            from . import _rank_kernel

            _rank_kernel.warm_up()  # compiled once here, inherited by the workers
            _FORKED_JOBS[:] = jobs  # inherited by the forked workers: nothing large is pickled
            try:
                with ProcessPoolExecutor(len(jobs), mp_context=get_context("fork")) as ex:
                    results = list(ex.map(_run_forked_job, range(len(jobs))))
            finally:
                _FORKED_JOBS.clear()
        write_dataset_dir(tmp, [Path(j.out_file) for j in jobs], features)
    hist = sum(r["lengths_hist"] for r in results)
    return TokenizeResult(out_dir=out_dir, cells=sum(r["cells"] for r in results),
                          dropped_zero_count=sum(r["dropped_zero_count"] for r in results),
                          seconds=time.perf_counter() - t0, lengths_hist=hist, coverage=cov, coverage_table=cov_table)


# ------------------------------------------------------------- reading the h5ad ----

def read_obs_full(path: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Those of ``names`` that are obs columns, read whole (small per-cell columns only)."""
    stored = data_mod.obs_keys(path)
    have = [n for n in names if n in stored]
    with data_mod.ObsColumns(path, have) as obs:
        return {n: obs.read(n, 0, obs.n_obs) for n in have}


def read_gene_names(path: Path, counts: str, gene_names: str) -> np.ndarray:
    import h5py
    from anndata.io import read_elem

    with h5py.File(path, "r") as f:
        var = read_elem(f["raw/var"] if counts == "raw" else f["var"])
    if gene_names == "index":
        return np.asarray(var.index.astype(str))
    if gene_names not in var.columns:
        raise TokenizeError(f"gene names column {gene_names!r} is not in var (columns: {', '.join(map(str, var.columns)) or 'none'}). "
                            "Fix: name one of them, or 'index' for the var names.")
    return np.asarray(var[gene_names].astype(str))


def tokenize_h5ad(path: Path, out_dir: Path, *, model_name: str, dict_dir: Path, label_key: str | None = None,
                  gene_names: str = "index", gene_id_type: str = "symbol", counts: str = "X",
                  shard: tuple[int, int] = (0, 1), workers: int = 1, chunk_size: int = 2048) -> TokenizeResult:
    """The command-line entry: tokenize a whole h5ad (or one shard of its rows) like helical."""
    from .params import GENEFORMER_MODELS

    if model_name not in GENEFORMER_MODELS:
        raise TokenizeError(f"unknown model {model_name!r}; known: {', '.join(GENEFORMER_MODELS)}")
    spec = GENEFORMER_MODELS[model_name]
    tk = RankValueTokenizer.from_files(dict_dir, input_size=spec["input_size"], special_token=spec["special_token"])
    path = Path(path)
    data_mod.open_h5(path).close()  # clear errors for missing/truncated/non-h5ad files, without reading obs/var
    names = read_gene_names(path, counts, gene_names)
    ensembl = map_genes(pd.Series(names), gene_id_type, tk.mapping)
    have = data_mod.obs_keys(path)
    if label_key and label_key not in have:
        raise TokenizeError(f"label column {label_key!r} is not in obs (columns: {', '.join(have) or 'none'}). "
                            "Fix: pass --label-key with one of them.")
    # per-cell columns are read chunk by chunk in the workers; only filter_pass is read whole
    with data_mod.ObsColumns(path, ["filter_pass"] if "filter_pass" in have else []) as obs:
        n_obs = obs.n_obs
        rows = np.arange(n_obs)
        if "filter_pass" in have:
            rows = rows[np.asarray(obs.read("filter_pass", 0, n_obs) == 1)]
    if n_obs == 0:
        raise TokenizeError(f"{path} has no cells.")
    i, n = shard
    rows = shard_rows(rows, i, n)
    columns: dict[str, np.ndarray | str] = {"cell_id": data_mod.ObsColumns.NAMES}
    if label_key:
        columns[label_key] = label_key
    target = Path(out_dir) / shard_name(i, n) if n > 1 else Path(out_dir)
    return tokenize_rows(path, target, tk, counts=counts, ensembl_ids=list(ensembl), gene_names=list(names),
                         rows=rows, columns=columns, n_counts="n_counts" if "n_counts" in have else None,
                         workers=workers, chunk_size=chunk_size, dataset_label=path.name)


# ------------------------------------------------------------------ the stage ----

def label_mapping(split: pd.DataFrame) -> dict[str, int]:
    labels = sorted(split.loc[split.split != "excluded", "label"].dropna().astype(str).unique())
    return {lab: i for i, lab in enumerate(labels)}


def tokenize_stage(params: "Params", run_dir: Path, shard: str | None = None) -> dict[str, Any]:
    """Tokenize the cells the load stage kept (one shard of them when ``shard`` is 'I/N')."""
    run_dir = Path(run_dir)
    i, n = parse_shard(shard) if shard else (0, params.tokenize.shards)
    if shard is None and n > 1:
        raise TokenizeError(f"tokenize.shards is {n}: run each shard ('0/{n}' ... '{n - 1}/{n}'), as the DAG does.")
    split = data_mod.read_split(run_dir)
    genes = pd.read_csv(run_dir / "load" / "genes.csv", index_col=0)
    model_mod.ensure_model_files(params, run_dir)
    paths = model_mod.model_paths(params)
    spec = params.model.spec
    tk = RankValueTokenizer.from_files(paths["version_dir"], input_size=spec["input_size"], special_token=spec["special_token"])
    ensembl = map_genes(genes["gene"], params.data.gene_id_type, tk.mapping)
    cov_table, cov = gene_coverage(genes["gene"], ensembl, tk.token_dict, genes["n_cells"].to_numpy())
    if cov["in_vocabulary"] == 0:
        raise no_genes_error(params.data_path.name, params.model.name, cov)
    label_ids = label_mapping(split)
    keep = split[split.split != "excluded"].sort_values("row")
    keep = keep.iloc[shard_rows(np.arange(len(keep)), i, n)]

    out_root = run_dir / OUTPUT
    out_root.mkdir(parents=True, exist_ok=True)
    target = out_root / shard_name(i, n)
    t0 = time.perf_counter()
    if params.tokenize.implementation == "helical":
        ds = _tokenize_with_helical(params, keep, ensembl, label_ids)
        with runs.stage_output(out_root, target.name) as tmp:
            ds.save_to_disk(str(tmp))
        lengths = np.asarray(ds["length"])
        cells, dropped = len(ds), 0
        hist = np.bincount(lengths, minlength=spec["input_size"] + 1)
    else:
        have = data_mod.obs_keys(params.data_path)
        obs_cols = read_obs_full(params.data_path, ["filter_pass"])
        rows = keep["row"].to_numpy()
        keep_mask = np.ones(len(rows), dtype=bool)
        if "filter_pass" in obs_cols:
            keep_mask = np.asarray(obs_cols["filter_pass"][rows] == 1)
        keep, rows = keep[keep_mask], rows[keep_mask]
        columns = {
            "cell_id": keep["cell_id"].astype(str).to_numpy(dtype=object),
            "label": keep["label"].astype(str).to_numpy(dtype=object),
            "label_id": keep["label"].astype(str).map(label_ids).to_numpy(dtype=np.int64),
            "split": keep["split"].astype(str).to_numpy(dtype=object),
        }
        res = tokenize_rows(params.data_path, target, tk, counts=params.data.counts, ensembl_ids=list(ensembl),
                            gene_names=list(genes["gene"].astype(str)), rows=rows, columns=columns,
                            n_counts="n_counts" if "n_counts" in have else None,
                            workers=params.tokenize.workers or max(1, int(params.profile_for("tokenize").cpus)),
                            chunk_size=params.tokenize.chunk_size, dataset_label=params.data_path.name,
                            coverage=(cov_table, cov))
        cells, dropped, hist = res.cells, res.dropped_zero_count, res.lengths_hist
    elapsed = time.perf_counter() - t0
    summary = {
        "implementation": params.tokenize.implementation,
        "model": params.model.name,
        "shard": f"{i}/{n}",
        "cells": int(cells),
        "dropped_zero_count_cells": int(dropped),
        "seconds": elapsed,
        "cells_per_second": cells / elapsed if elapsed > 0 else None,
        "length": length_summary(hist),
        "gene_coverage": cov,
        "labels": label_ids,
    }
    for name, write in ((LABELS_FILE, lambda p: p.write_text(json.dumps(label_ids, indent=2))),
                        ("gene_coverage.csv", lambda p: cov_table.to_csv(p, index=False)),
                        (f"summary.{shard_name(i, n)}.json", lambda p: p.write_text(json.dumps(summary, indent=2)))):
        tmpf = out_root / f".{name}.tmp-{os.getpid()}"
        write(tmpf)
        os.replace(tmpf, out_root / name)
    return summary


def _tokenize_with_helical(params: "Params", keep: pd.DataFrame, ensembl: pd.Series, label_ids: dict[str, int]):
    """helical's TranscriptomeTokenizer on the kept cells, held in memory (the reference)."""
    import anndata
    import scipy.sparse as sp
    from helical.models.geneformer.geneformer_tokenizer import TranscriptomeTokenizer

    paths = model_mod.model_paths(params)
    rows = keep["row"].to_numpy()
    with data_mod.CountsReader(params.data_path, params.data.counts) as r:
        X = r.rows(int(rows.min()), int(rows.max()) + 1, dense_ok=True)[rows - rows.min()]
    X = X if isinstance(X, np.ndarray) else sp.csr_matrix(X)
    obs_cols = read_obs_full(params.data_path, ["n_counts", "filter_pass"])
    obs = pd.DataFrame({
        "cell_id": keep["cell_id"].astype(str).values,
        "label": keep["label"].astype(str).values,
        "label_id": [label_ids[lab] for lab in keep["label"].astype(str)],
        "split": keep["split"].values,
    })
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


def expected_shards(params: "Params") -> int:
    return params.tokenize.shards


def load_tokenized(run_dir: Path, expected: int | None = None):
    """All shards of a run's tokenized output, concatenated (memory-mapped Arrow)."""
    from datasets import concatenate_datasets, load_from_disk

    d = runs.require_stage_output(run_dir, OUTPUT, "tokenize")
    shards = sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("shard-"))
    if not shards:
        raise FileNotFoundError(f"{d} holds no shards. Fix: re-run the tokenize stage.")
    n = int(shards[0].name.rsplit("-", 1)[-1])
    if expected is not None and n != expected or len(shards) != n:
        raise FileNotFoundError(f"{d} holds {len(shards)} of {n} shards. Fix: re-run the missing tokenize shards.")
    parts = [load_from_disk(str(p)) for p in shards]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def read_labels(run_dir: Path) -> dict[str, int]:
    d = runs.require_stage_output(run_dir, OUTPUT, "tokenize")
    return json.loads((d / LABELS_FILE).read_text())


def read_summaries(run_dir: Path) -> list[dict[str, Any]]:
    d = runs.require_stage_output(run_dir, OUTPUT, "tokenize")
    return [json.loads(p.read_text()) for p in sorted(d.glob("summary.shard-*.json"))]


def split_subset(ds, split: str):
    idx = np.nonzero(np.asarray(ds["split"]) == split)[0]
    return ds.select(idx)
