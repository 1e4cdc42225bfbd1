"""Geneformer's rank-value encoding: counts -> tokens, exactly helical's ``TranscriptomeTokenizer``.

The semantics it copies:

* a cell's size factor is ``obs["n_counts"]`` when that column exists (the caller passes
  it), else the sum of its counts over *all* genes of the matrix; values are
  ``(x / n) * 10000 / median``, computed with the same numpy dtypes as helical, so ties
  break identically;
* genes whose ``ensembl_id`` is a key of the token dictionary are used, in matrix column
  order; genes are ranked by ``np.argsort(-value)`` (numpy's default sort, as helical);
* truncation to the model input size; ``<cls>`` ... ``<eos>`` for models with special
  tokens (v2/v3), none for v1;
* duplicate Ensembl ids: helical collapses genes only when *different* ids map to the same
  id through the Ensembl mapping dictionary. A dataset that simply repeats an id is not
  collapsed: each column keeps its own token (so a token can appear twice), exactly as in
  helical. When different ids do map to one id, helical 2.2.0 raises ``KeyError:
  'ensembl_id'``; we collapse as the original Geneformer does (counts summed per mapped
  id, size factor over mapped genes) instead of failing.

Documented difference: cells with zero total counts are dropped (the ``kept`` mask of
:meth:`RankValueTokenizer.encode_block`; helical emits an empty cell for a sparse matrix,
and every gene in an arbitrary order of NaNs for a dense one).

Two paths, same tokens: :meth:`RankValueTokenizer.encode_csr`, the compiled one for raw CSR
arrays (:mod:`._kernel`: cells whose values are all distinct are ranked by sorting packed
keys; cells with ties by ``np.argsort``, as helical), and
:meth:`RankValueTokenizer.encode_block`, the vectorised numpy one for dense, collapsed or
unusual matrices. The compiled kernels load on first use, not at import.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import data as data_mod
from .. import model as model_mod

TARGET_SUM = 10_000
_PROBE_ROWS = 64  # cells per block whose keys are sorted before deciding whether the block is tie-heavy
_SUB_ROWS = 32  # cells encoded together by the compiled passes


class TokenizeError(ValueError):
    """Tokenization cannot go ahead as asked. The message names the problem and the fix."""


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


def gene_coverage(
    names: Sequence[str], ensembl: Sequence[str | None], token_dict: dict[str, int], n_cells: np.ndarray | None = None
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """How many of the dataset's genes map to tokens, and which do not."""
    df = pd.DataFrame({"gene": pd.Series(names).astype(str).values, "ensembl_id": list(ensembl)})
    df["in_vocabulary"] = df["ensembl_id"].isin(token_dict.keys())
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

    cols: np.ndarray  # matrix columns used, ascending
    tokens: np.ndarray  # token of each used column (int32)
    medians: np.ndarray  # gene median of each used column (float64)
    groups: np.ndarray | None = None  # collapse path: output slot of each used column
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

    def __init__(
        self,
        token_dict: dict[str, int],
        median_dict: dict[str, float],
        mapping_dict: dict[str, str] | None,
        *,
        input_size: int,
        special_token: bool,
    ):
        self.token_dict = token_dict
        self.median_dict = median_dict
        keys = set(token_dict)
        mapping = mapping_dict if mapping_dict is not None else {k: k for k in token_dict}
        self.mapping = {k: v for k, v in mapping.items() if v in keys}  # as helical filters it
        self.input_size = input_size
        self.special_token = special_token
        if special_token and ("<cls>" not in token_dict or "<eos>" not in token_dict):
            raise TokenizeError(
                "this model uses <cls>/<eos> tokens but the token dictionary has none. "
                "Fix: use the dictionaries of the model's version (v2/v3)."
            )
        self.cls = token_dict.get("<cls>")
        self.eos = token_dict.get("<eos>")
        # how input_ids are stored: uint16 where every token fits (half the bytes of int32)
        self.token_dtype = np.dtype(np.uint16 if max(token_dict.values(), default=0) < 1 << 16 else np.int32)

    @classmethod
    def from_files(cls, dict_dir: Path, *, input_size: int, special_token: bool) -> "RankValueTokenizer":
        dict_dir = Path(dict_dir)
        loaded = {}
        for name in model_mod.DICTIONARIES:
            p = dict_dir / name
            if not p.is_file():
                raise TokenizeError(
                    f"{p} is missing. Fix: point --model-dir at the folder with "
                    f"{', '.join(model_mod.DICTIONARIES)} for this model version."
                )
            with open(p, "rb") as f:
                loaded[name] = pickle.load(f)
        return cls(
            loaded["token_dictionary.pkl"],
            loaded["gene_median_dictionary.pkl"],
            loaded["ensembl_mapping_dict.pkl"],
            input_size=input_size,
            special_token=special_token,
        )

    def plan(self, ensembl_ids: Sequence[str | None]) -> GenePlan:
        ids = list(ensembl_ids)
        in_map = [g for g in ids if g is not None and g in self.mapping]
        if len(set(in_map)) == len({self.mapping[g] for g in in_map}):
            # helical: no collapse; genes keyed by their own ensembl_id
            cols = np.array([j for j, g in enumerate(ids) if g is not None and g in self.token_dict], dtype=np.int64)
            used = [ids[j] for j in cols]
            self._check_medians(used)
            return GenePlan(
                cols=cols,
                tokens=np.array([self.token_dict[g] for g in used], dtype=np.int32),
                medians=np.array([self.median_dict[g] for g in used], dtype=np.float64),
            )
        # collapse (original Geneformer semantics; helical 2.2.0 raises KeyError here)
        collapsed = [self.mapping.get(str(g).upper()) if g is not None else None for g in ids]
        count_cols = np.array([j for j, c in enumerate(collapsed) if c is not None], dtype=np.int64)
        slots: dict[str, int] = {}
        for j in count_cols:
            slots.setdefault(collapsed[j], len(slots))
        order = list(slots)
        self._check_medians(order)
        return GenePlan(
            cols=count_cols,
            tokens=np.array([self.token_dict[g] for g in order], dtype=np.int32),
            medians=np.array([self.median_dict[g] for g in order], dtype=np.float64),
            groups=np.array([slots[collapsed[j]] for j in count_cols], dtype=np.int64),
            count_cols=count_cols,
        )

    def _check_medians(self, genes: Sequence[str]) -> None:
        missing = [g for g in genes if g not in self.median_dict]
        if missing:
            raise TokenizeError(
                f"{len(missing)} genes of the token dictionary have no gene median "
                f"(e.g. {missing[:3]}). Fix: use the gene median dictionary of the same model version."
            )

    def encode_block(
        self, block, plan: GenePlan, n_counts: np.ndarray | None = None
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

    def encode_csr(
        self,
        indptr: np.ndarray,
        indices: np.ndarray,
        data: np.ndarray,
        plan: GenePlan,
        n_genes: int,
        n_counts: np.ndarray | None = None,
        selected: np.ndarray | None = None,
        work: dict[str, np.ndarray] | None = None,
    ):
        """The compiled fast path of :meth:`encode_block` for raw CSR arrays (rows over all ``n_genes``).

        Same tokens as ``encode_block``: keys sort the cells whose values are distinct, and
        ``np.argsort`` ranks the cells with ties (see :mod:`._kernel`). ``selected`` masks
        the rows to encode (others are skipped, not counted); ``n_counts`` is aligned with
        all rows. Returns (flat tokens, offsets, kept-of-selected mask), views of ``work``
        buffers valid until the next call; or None where only the general path applies
        (collapse, indices not sorted within rows, dtypes other than float32/float64 work).
        Raises ValueError("negative" / "not finite") for such a stored value.
        """
        import scipy.sparse as sp

        from . import _kernel as K

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
            buffers = (("keys", np.uint32), ("neg", np.float64), ("toks", np.int32), ("order", np.int32))
            keys, neg, toks, order = (data_mod.reusable_buffer(work, name, nnz, dt) for name, dt in buffers)
            out_ptr = data_mod.reusable_buffer(work, "out_ptr", r1 - r0 + 1, np.int64)
            tied = data_mod.reusable_buffer(work, "tied", r1 - r0, np.bool_)
            scratch = data_mod.reusable_buffer(work, "scratch", n_genes, np.int32)
            status = K.prepare(
                indptr[r0 : r1 + 1],
                indices,
                x,
                recip[r0:r1],
                tsum,
                colmap,
                plan.recip_medians,
                plan.tokens,
                check[r0:r1],
                ok,
                keys,
                neg,
                toks,
                out_ptr,
                tied,
            )
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

        m = sp.csr_matrix(
            (np.ones(len(plan.cols)), (np.arange(len(plan.cols)), plan.groups)),
            shape=(len(plan.cols), len(plan.tokens)),
        )
        sub = block[:, plan.cols]
        out = sub @ m
        return out.tocsr() if sp.issparse(out) else np.asarray(out)

    @staticmethod
    def _select_columns(block, cols: np.ndarray, plan: GenePlan):
        """CSR column selection (ascending ``cols``), vectorised: (indptr, positions in cols, data).

        Same entries in the same order as ``block[:, cols]``, without scipy's per-row work.
        """
        block.sort_indices()
        colmap = plan.column_map(block.shape[1]) if cols is plan.cols else _column_map(cols, block.shape[1])
        pos = colmap[block.indices]
        if len(cols) == block.shape[1] or pos.min(initial=0) >= 0:  # every stored gene is used
            return block.indptr.astype(np.int64), pos, block.data
        m = pos >= 0
        indptr = np.concatenate(([0], np.cumsum(m, dtype=np.int64)))[block.indptr]  # entries kept before each row
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


def _sort_rows(keys: np.ndarray, out_ptr: np.ndarray, rows: np.ndarray) -> None:
    """Sort each row's keys in place (numpy's SIMD sort)."""
    for s, e in zip(out_ptr[rows].tolist(), out_ptr[rows + 1].tolist()):
        keys[s:e].sort()


def _column_map(cols: np.ndarray, n_genes: int) -> np.ndarray:
    """Position of each matrix column among ``cols``, -1 where it is not used."""
    m = np.full(n_genes, -1, dtype=np.int32)
    m[cols] = np.arange(len(cols), dtype=np.int32)
    return m


def warm_up() -> None:
    """Load (or compile, the first time) the compiled kernels, e.g. before forking workers."""
    from . import _kernel

    _kernel.warm_up()
