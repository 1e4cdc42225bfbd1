"""Datasets: open an ``.h5ad`` in backed mode, validate it, stream counts, QC and split.

The count matrix is never loaded whole: :class:`CountsReader` reads row ranges straight
from the HDF5 file (``X``, ``raw/X`` or ``layers/<name>``), CSR or dense.

Missing labels follow one rule, here, for the load stage and the ``tokenize`` command alike:
:func:`missing_labels` says which cells have none (NaN/None, or an empty or blank string) and
:func:`check_labels` decides: no label for any cell is an error naming the column and the
fix; some cells without one are counted and logged, and left out of training (the load
stage marks them ``excluded`` in ``split.csv``; the ``tokenize`` command writes a null label).

The split (:func:`stratified_split`) is per cell, or, with ``data.split.group_by``, per group
(:func:`grouped_split`): all cells of a donor, sample or batch go to one split, so none leaks.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import files, runs
from .files import file_sha256

if TYPE_CHECKING:
    from .params import Params

log = logging.getLogger(__name__)

SPLIT_FILE = "split.csv"
GROUPS_FILE = "groups.csv"
QC_FILE = "qc_summary.json"


class DatasetError(ValueError):
    """The dataset cannot be used as the params say. The message names the problem and the fix."""


def open_h5(path: Path):
    """The file opened with h5py, or a DatasetError saying it is missing, truncated or not HDF5."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found. Fix: check data.path in the params file.")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DatasetError(
            f"{path} is not a readable .h5ad file ({e}). It may be truncated or not HDF5 at all. "
            "Fix: re-copy or re-export the file (AnnData.write_h5ad)."
        ) from None


def open_backed(path: Path):
    """Open an .h5ad in backed mode (obs/var in memory, the matrix stays on disk)."""
    import anndata

    with open_h5(path):
        pass
    try:
        return anndata.read_h5ad(path, backed="r")
    except Exception as e:
        raise DatasetError(
            f"{path} could not be opened as AnnData ({type(e).__name__}: {e}). "
            "Fix: check that it was written by anndata (AnnData.write_h5ad) and is complete."
        ) from None


def _attr(node, name: str, default: str) -> str:
    """A string attribute of an HDF5 node (h5py may return it as bytes)."""
    value = node.attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else value


def _matrix_key(source: str) -> str:
    if source == "X":
        return "X"
    if source == "raw":
        return "raw/X"
    return "layers/" + source.removeprefix("layer:")


class _RawLayout:
    """Where an uncompressed 1-d HDF5 dataset's elements lie in the file, so that element
    ranges are read with ``pread`` straight into a buffer: HDF5's per-chunk bookkeeping
    costs more than the copy for the small chunks anndata writes. Only for layouts that
    can be read this way (no filters, native byte order, every chunk allocated, no user
    block); anything else returns None from :meth:`of` and is read through h5py."""

    def __init__(self, fd: int, chunk: int, offsets: np.ndarray, itemsize: int):
        self.fd, self.chunk, self.offsets, self.itemsize = fd, chunk, offsets, itemsize

    @classmethod
    def of(cls, f, ds) -> "_RawLayout | None":
        try:
            if (
                ds.ndim != 1
                or ds.dtype.newbyteorder("=") != ds.dtype
                or ds.id.get_create_plist().get_nfilters()
                or f.id.get_create_plist().get_userblock()
                or f.driver != "sec2"
                or len(ds) == 0
            ):
                return None
            if ds.chunks is None:
                off = ds.id.get_offset()
                chunk, offsets = len(ds), np.array([-1 if off is None else off], dtype=np.int64)
            else:
                chunk = ds.chunks[0]
                offsets = np.full(-(-len(ds) // chunk), -1, dtype=np.int64)

                def note(info):
                    offsets[info.chunk_offset[0] // chunk] = info.byte_offset

                ds.id.chunk_iter(note)
            if (offsets < 0).any():
                return None
            raw = cls(os.open(f.filename, os.O_RDONLY), chunk, offsets, ds.dtype.itemsize)
            n = min(len(ds), 4096)  # same values as HDF5 gives, or not used at all
            probe = np.empty(n, ds.dtype)
            raw.read(len(ds) - n, len(ds), probe)
            if not np.array_equal(probe, ds[len(ds) - n :], equal_nan=probe.dtype.kind == "f"):
                os.close(raw.fd)
                return None
            return raw
        except (AttributeError, OSError, RuntimeError, ValueError, TypeError):
            return None

    def read(self, a: int, b: int, out: np.ndarray) -> None:
        """Elements [a, b) into out[: b - a]."""
        mv = memoryview(out.view(np.uint8))
        c, isz = self.chunk, self.itemsize
        for k in range(a // c, (b - 1) // c + 1):
            s, e = max(a, k * c), min(b, (k + 1) * c)
            want = (e - s) * isz
            got = os.preadv(self.fd, [mv[(s - a) * isz : (e - a) * isz]], int(self.offsets[k]) + (s - k * c) * isz)
            if got != want:
                raise OSError(f"short read of {self.fd}: {got} of {want} bytes")


def reusable_buffer(work: dict[str, np.ndarray], name: str, n: int, dtype) -> np.ndarray:
    """A view of n items of an array kept in ``work`` under ``name``, grown (by at least
    25 %) only when too small: streaming loops reuse memory instead of allocating per chunk."""
    buf = work.get(name)
    if buf is None or len(buf) < n or buf.dtype != dtype:
        buf = work[name] = np.empty(max(n, int(1.25 * len(buf)) if buf is not None else n), dtype=dtype)
    return buf[:n]


class CountsReader:
    """Row-range reader over one count matrix of an .h5ad file, without loading it whole."""

    def __init__(self, path: Path, source: str = "X"):
        from anndata.io import sparse_dataset

        self.path = Path(path)
        self.source = source
        self._f = open_h5(path)
        key = _matrix_key(source)
        if key not in self._f:
            available = (
                ["X"]
                + (["raw"] if "raw/X" in self._f else [])
                + [f"layer:{k}" for k in self._f.get("layers", {}).keys()]
            )
            self._f.close()
            raise DatasetError(
                f"{path}: no count matrix at '{source}'. Fix: set data.counts to one of {', '.join(available)}."
            )
        node = self._f[key]
        enc = _attr(node, "encoding-type", "array")
        if enc == "csc_matrix":
            self._f.close()
            raise DatasetError(
                f"{path}: the matrix at '{source}' is stored as CSC (column-major), which cannot be streamed "
                "by rows. Fix: convert it once to CSR, e.g. `helical-workflow to-csr IN.h5ad OUT.h5ad` "
                "(or in Python: adata.X = adata.X.tocsr(); adata.write_h5ad(...))."
            )
        if enc == "csr_matrix":
            self._m = sparse_dataset(node)
        elif hasattr(node, "shape") and len(node.shape) == 2:
            self._m = node
        else:
            self._f.close()
            raise DatasetError(
                f"{path}: '{source}' has unsupported encoding {enc!r}. Fix: store counts as CSR or dense."
            )
        self.sparse = enc == "csr_matrix"
        self._node = node
        self._raw: dict[str, _RawLayout | None] = {}  # per CSR dataset, found on first read
        self.shape = tuple(int(x) for x in self._m.shape)
        self.dtype = self._m.dtype

    @property
    def n_obs(self) -> int:
        return self.shape[0]

    def rows(self, start: int, stop: int, dense_ok: bool = False):
        """Rows [start, stop) as CSR (or, with ``dense_ok``, as a dense array when stored dense)."""
        block = self._m[start:stop]
        if sp.issparse(block):
            return block.tocsr()
        return np.asarray(block) if dense_ok else sp.csr_matrix(np.asarray(block))

    def csr_arrays(
        self, start: int, stop: int, buffers: dict[str, np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows [start, stop) of a CSR matrix as raw (indptr from 0, indices, data), read
        straight from the HDF5 datasets. With ``buffers`` (a dict kept between calls) the
        arrays are read into reused memory: valid until the next call."""
        g = self._node
        indptr = g["indptr"][start : stop + 1].astype(np.int64)
        a, b = int(indptr[0]), int(indptr[-1])
        indptr -= a
        out = []
        for name in ("indices", "data"):
            ds = g[name]
            buf = reusable_buffer({} if buffers is None else buffers, name, b - a, ds.dtype)
            if b > a:
                raw = self._raw_layout(name, ds)
                if raw is not None:
                    raw.read(a, b, buf)
                else:
                    ds.read_direct(buf, np.s_[a:b], np.s_[0 : b - a])
            out.append(buf)
        return indptr, out[0], out[1]

    def _raw_layout(self, name: str, ds) -> "_RawLayout | None":
        if name not in self._raw:
            self._raw[name] = _RawLayout.of(self._f, ds)
        return self._raw[name]

    def chunks(self, chunk_size: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, sp.csr_matrix]]:
        stop = self.n_obs if stop is None else stop
        for s in range(start, stop, chunk_size):
            yield s, self.rows(s, min(s + chunk_size, stop))

    def close(self) -> None:
        for raw in self._raw.values():
            if raw is not None:
                os.close(raw.fd)
        self._f.close()

    def __enter__(self) -> "CountsReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def obs_keys(path: Path) -> list[str]:
    """The obs column names stored in an .h5ad (not the index)."""
    with open_h5(path) as f:
        return [k for k in f["obs"].keys() if not k.startswith("_")]


class ObsColumns:
    """Columns of ``obs`` (and ``obs_names``, as :attr:`NAMES`) read by row ranges straight from
    the file: a streaming pass holds one chunk of them, never the whole table."""

    NAMES = "obs_names"

    def __init__(self, path: Path, names: list[str]):
        import h5py
        from anndata.io import read_elem

        self._f = open_h5(path)
        obs = self._f["obs"]
        index = _attr(obs, "_index", "_index")
        self._read: dict[str, Any] = {}
        for name in names:
            node = obs[index if name == self.NAMES else name]
            enc = _attr(node, "encoding-type", "array")
            if enc == "categorical":
                self._read[name] = _categorical_reader(np.asarray(read_elem(node["categories"])), node["codes"])
            elif enc == "string-array":
                self._read[name] = lambda a, b, node=node: node.asstr()[a:b]
            elif enc in ("nullable-integer", "nullable-boolean", "nullable-string-array"):
                self._read[name] = _nullable_reader(node["values"], node["mask"])
            elif isinstance(node, h5py.Dataset) and node.ndim == 1:
                self._read[name] = lambda a, b, node=node: node[a:b]
            else:
                self._f.close()
                raise DatasetError(
                    f"{path}: obs column {name!r} has encoding {enc!r}, which cannot be read by rows. "
                    "Fix: store it as a categorical, string or numeric column."
                )
        self.n_obs = int(obs[index].shape[0])

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        return self._read[name](start, stop)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "ObsColumns":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _categorical_reader(categories: np.ndarray, codes):
    def read(a: int, b: int) -> np.ndarray:
        c = codes[a:b]
        if (c >= 0).all():
            return categories[c]
        out = categories.astype(object)[c]
        out[c < 0] = np.nan  # as pandas shows a missing category
        return out

    return read


def _nullable_reader(values, mask):
    def read(a: int, b: int) -> np.ndarray:
        v, m = values[a:b], mask[a:b].astype(bool)
        if not m.any():
            return v
        out = v.astype(object)
        out[m] = np.nan
        return out

    return read


def missing_labels(values) -> np.ndarray:
    """Which cells have no label (bool per cell): NaN, None or NA, or an empty or blank string."""
    codes, uniques = pd.factorize(values if isinstance(values, pd.Series) else np.asarray(values, dtype=object))
    blank = [str(u).strip() == "" for u in uniques]  # a few distinct labels: decided once each
    return np.array([*blank, True], dtype=bool)[codes]  # code -1: NaN, None or NA


def check_labels(key: str, missing: np.ndarray, *, dataset: str, fix: str) -> int:
    """The missing-label rule (``missing``: :func:`missing_labels` of the cells concerned).

    No label for any cell is a DatasetError naming the column and ``fix``; otherwise the
    number of cells without one is returned, and logged when there are some: the caller
    reports it and leaves those cells out of training.
    """
    n, k = len(missing), int(np.count_nonzero(missing))
    if n and k == n:
        raise DatasetError(
            f"label column {key!r} of {dataset} has no value for any of its {n} cells (all NaN or empty). Fix: {fix}."
        )
    if k:
        log.warning(
            "label column %r of %s: %d of %d cells have no label (NaN or empty); they are left out of training",
            key,
            dataset,
            k,
            n,
        )
    return k


def gene_table(adata, params: "Params") -> pd.DataFrame:
    """The genes of the count matrix the params select (``raw`` has its own var)."""
    var = adata.raw.var if params.data.counts == "raw" else adata.var
    col = params.data.gene_names
    if col == "index":
        names = pd.Index(var.index.astype(str))
    elif col in var.columns:
        names = pd.Index(var[col].astype(str))
    else:
        where = "adata.raw.var" if params.data.counts == "raw" else "adata.var"
        raise DatasetError(
            f"data.gene_names: column {col!r} is not in {where} "
            f"(columns: {', '.join(map(str, var.columns)) or 'none'}). "
            "Fix: name one of those columns, or use 'index' for the var names."
        )
    return pd.DataFrame({"gene": names.values}, index=var.index.astype(str))


def check_dataset(params: "Params", adata=None) -> dict[str, Any]:
    """Checks that need the file open: label column, counts source, genes. Cheap (no matrix read)."""
    adata = adata if adata is not None else open_backed(params.data_path)
    key = params.data.label_key
    if key not in adata.obs.columns:
        raise DatasetError(
            f"data.label_key: column {key!r} is not in adata.obs of {params.data_path.name} "
            f"(columns: {', '.join(map(str, adata.obs.columns)) or 'none'}). Fix: set label_key to one of them."
        )
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise DatasetError(f"{params.data_path}: the dataset is empty ({adata.n_obs} cells × {adata.n_vars} genes).")
    labels = adata.obs[key]
    missing = missing_labels(labels)
    n_missing = check_labels(key, missing, dataset=params.data_path.name, fix="set data.label_key to a labelled column")
    grouping = check_groups(params, adata.obs) if params.data.split.group_by else {}
    with CountsReader(params.data_path, params.data.counts) as r:
        shape = r.shape
    genes = gene_table(adata, params)
    if shape[1] != len(genes):
        raise DatasetError(
            f"{params.data_path}: counts at '{params.data.counts}' have {shape[1]} genes but var has {len(genes)}."
        )
    return {
        "n_cells": int(shape[0]),
        "n_genes": int(shape[1]),
        "n_labels": int(labels[~missing].nunique()),
        "missing_labels": n_missing,
        **grouping,
    }


def check_groups(params: "Params", obs: pd.DataFrame) -> dict[str, Any]:
    """Checks of ``data.split.group_by``: the column exists, is not the label column, and gives
    some cells a group. Cells without one (:func:`missing_labels`' rule: NaN or empty) are
    counted and logged; the split leaves them out. Returns ``n_groups`` and ``missing_groups``."""
    col, key, name = params.data.split.group_by, params.data.label_key, params.data_path.name
    if col not in obs.columns:
        raise DatasetError(
            f"data.split.group_by: column {col!r} is not in adata.obs of {name} "
            f"(columns: {', '.join(map(str, obs.columns)) or 'none'}). "
            "Fix: set group_by to one of them (e.g. the donor or sample column), or leave it unset."
        )
    if col == key:
        raise DatasetError(
            f"data.split.group_by: {col!r} is also data.label_key; grouping by the label would put each "
            "cell type in one split only. Fix: group by a donor, sample or batch column."
        )
    missing = missing_labels(obs[col])
    n, k = len(missing), int(np.count_nonzero(missing))
    if n and k == n:
        raise DatasetError(
            f"data.split.group_by: column {col!r} of {name} has no value for any of its {n} cells "
            "(all NaN or empty). Fix: group by a filled column, or leave group_by unset."
        )
    if k:
        log.warning(
            "group column %r of %s: %d of %d cells have no group (NaN or empty); they are left out of the split",
            col,
            name,
            k,
            n,
        )
    return {"n_groups": int(obs[col][~missing].nunique()), "missing_groups": k}


@dataclass
class QC:
    cells: pd.DataFrame  # per cell: total_counts, n_genes
    genes: pd.DataFrame  # per gene: total_counts, n_cells


def compute_qc(params: "Params", obs_names: pd.Index, genes: pd.DataFrame) -> QC:
    """One streaming pass over the counts: per-cell and per-gene totals, and value checks."""
    n_counts, n_genes_per_cell = [], []
    gene_total = np.zeros(len(genes), dtype=np.float64)
    gene_cells = np.zeros(len(genes), dtype=np.int64)
    with CountsReader(params.data_path, params.data.counts) as r:
        for start, block in r.chunks(params.data.chunk_size):
            data = block.data
            if data.size and not np.isfinite(data).all():
                first = np.flatnonzero(~np.isfinite(data))[0]  # its row: the last one starting at or before it
                bad = start + int(np.searchsorted(block.indptr, first, side="right")) - 1
                raise DatasetError(
                    f"{params.data_path}: counts at '{params.data.counts}' contain NaN or infinite values "
                    f"(first in cell {obs_names[bad]!r}). Fix: use raw counts (set data.counts) or clean the matrix."
                )
            if data.size and data.min() < 0:
                raise DatasetError(
                    f"{params.data_path}: counts at '{params.data.counts}' contain negative values "
                    f"(min {data.min():g}); this looks like scaled data, not counts. "
                    "Fix: point data.counts at raw counts (X, raw or layer:<name>)."
                )
            block.eliminate_zeros()
            n_counts.append(np.asarray(block.sum(axis=1)).ravel())
            n_genes_per_cell.append(np.diff(block.indptr))
            gene_total += np.asarray(block.sum(axis=0)).ravel()
            gene_cells += np.bincount(block.indices, minlength=len(genes))
    cells = pd.DataFrame(
        {"total_counts": np.concatenate(n_counts), "n_genes": np.concatenate(n_genes_per_cell)},
        index=obs_names,
    )
    genes = genes.assign(total_counts=gene_total, n_cells=gene_cells)
    return QC(cells=cells, genes=genes)


SPLITS = ("train", "validation", "test")
_CANDIDATES = 64  # greedy passes (one per group order) a grouped split picks the best of


def stratified_split(
    labels: pd.Series,
    *,
    train: float,
    validation: float,
    test: float,
    seed: int,
    min_cells: int,
    stratify: bool = True,
    groups: pd.Series | None = None,
    group_by: str = "group",
) -> pd.Series:
    """Assign each cell to train / validation / test, per class when stratified.

    Deterministic for a seed. Classes with fewer than ``min_cells`` cells, and cells with no
    label (NA), are marked ``excluded`` (reported by the load stage). With ``groups`` (one
    value per cell, e.g. the donor; the obs column is named by ``group_by`` in messages) the
    split is :func:`grouped_split`: every group goes to one split, and cells with no group
    (NA) are excluded too.
    """
    if groups is not None:
        fractions = (train, validation, test)
        return grouped_split(
            labels, groups, fractions, seed=seed, min_cells=min_cells, stratify=stratify, group_by=group_by
        )
    rng = np.random.default_rng(seed)
    out = pd.Series("excluded", index=labels.index, dtype=object)
    groups = labels.groupby(labels, observed=True).groups if stratify else {"all": labels.dropna().index}
    for _, idx in sorted(groups.items(), key=lambda kv: str(kv[0])):
        idx = np.array(idx)
        n = len(idx)
        if n < min_cells:
            continue
        order = idx[rng.permutation(n)]
        n_test = max(1, int(round(n * test))) if n >= 3 else 0
        n_val = int(round(n * validation)) if n - n_test >= 2 else 0
        if validation > 0 and n_val == 0 and n - n_test >= 3:
            n_val = 1
        out[order[:n_test]] = "test"
        out[order[n_test : n_test + n_val]] = "validation"
        out[order[n_test + n_val :]] = "train"
    return out


def grouped_split(
    labels: pd.Series,
    groups: pd.Series,
    fractions: tuple[float, float, float],
    *,
    seed: int,
    min_cells: int,
    stratify: bool = True,
    group_by: str = "group",
) -> pd.Series:
    """Assign whole groups (e.g. donors) to train / validation / test, so that no group leaks.

    Cells with no label or no group (NA), and classes with fewer than ``min_cells`` such
    cells, are ``excluded``. Each remaining group goes to one split. The deviation from the
    targets is the squared error of each split's share of the cells (and, when stratified,
    of each label's cells) against its fraction. Several greedy passes, each over the groups
    in another order (largest first, then orders drawn from ``seed``), put each group in the
    split whose deviation it lowers most, keeping one group back for each split still empty;
    of these candidates the one with the fewest labels missing from train, then the smallest
    deviation, is kept. Deterministic for a seed; with few groups most seeds give the same,
    best split.

    A DatasetError, naming the fix, when there are fewer groups than splits to fill.
    """
    out = pd.Series("excluded", index=labels.index, dtype=object)
    lab = pd.Series(labels).astype("string")
    grp = pd.Series(np.asarray(groups, dtype=object), index=labels.index).astype("string")  # by position
    ok = lab.notna().to_numpy() & grp.notna().to_numpy()
    sizes = lab[ok].value_counts()
    ok &= lab.map(sizes).fillna(0).to_numpy() >= min_cells
    if not ok.any():
        return out
    g_codes, g_names = pd.factorize(grp[ok], sort=True)
    l_codes, _ = pd.factorize(lab[ok], sort=True)
    counts = np.zeros((len(g_names), l_codes.max() + 1))  # cells per group and label
    np.add.at(counts, (g_codes, l_codes), 1)
    fractions = np.array(fractions, dtype=float)  # train, validation, test
    active = fractions > 0
    if len(g_names) < active.sum():
        wanted = [s for s, a in zip(SPLITS, active) if a]
        raise DatasetError(
            f"data.split.group_by: column {group_by!r} has {len(g_names)} group(s) with usable cells "
            f"({', '.join(map(str, g_names[:5]))}), but each of {', '.join(wanted)} needs at least one "
            "whole group. Fix: group by a column with more groups (e.g. sample instead of donor), "
            + ("set data.split.validation: 0 (train and test only), " if active[1] else "")
            + "or leave data.split.group_by unset to split cells independently."
        )
    choice = _assign_groups(counts, fractions, np.random.default_rng(seed), stratify)
    out.iloc[np.flatnonzero(ok)] = np.array(SPLITS, dtype=object)[choice[g_codes]]
    return out


def _assign_groups(counts: np.ndarray, fractions: np.ndarray, rng: np.random.Generator, stratify: bool) -> np.ndarray:
    """The split (0 train, 1 validation, 2 test) of each group, from cells per group and label
    (see :func:`grouped_split`). All candidates run together: arrays are (candidate, split, ...)."""
    n_groups, n_labels = counts.shape
    size = counts.sum(axis=1)
    per_label = counts.sum(axis=0)
    target_n = fractions * size.sum()  # (split,)
    target_l = fractions[:, None] * per_label[None, :]  # (split, label)
    w_n = 1.0 / size.sum() ** 2
    w_l = (1.0 / per_label**2 / n_labels) if stratify else np.zeros(n_labels)
    k = _CANDIDATES
    ties = rng.permutation(n_groups)
    orders = [ties[np.argsort(-size[ties], kind="stable")]] + [rng.permutation(n_groups) for _ in range(k - 1)]
    orders = np.array(orders)  # (candidate, step)
    n = np.zeros((k, 3))
    c = np.zeros((k, 3, n_labels))
    choice = np.zeros((k, n_groups), dtype=np.int64)
    closed = np.where(fractions > 0, 0.0, np.inf)  # a split with fraction 0 gets nothing
    rows = np.arange(k)
    for step in range(n_groups):
        g = orders[:, step]
        gn, gl = size[g][:, None], counts[g][:, None, :]  # (k, 1), (k, 1, label)
        delta = w_n * gn * (2 * (n - target_n) + gn) + (w_l * gl * (2 * (c - target_l) + gl)).sum(axis=2)
        empty = (n == 0) & np.isfinite(closed)
        must = empty.sum(axis=1) >= n_groups - step  # as many groups left as splits to fill
        delta = delta + closed + np.where(must[:, None] & ~empty, np.inf, 0.0)
        s = delta.argmin(axis=1)
        n[rows, s] += size[g]
        c[rows, s] += counts[g]
        choice[rows, g] = s
    deviation = w_n * ((n - target_n) ** 2).sum(axis=1) + (w_l * (c - target_l) ** 2).sum(axis=(1, 2))
    missing_in_train = (c[:, 0, :] == 0).sum(axis=1)
    best = np.lexsort((deviation, missing_in_train))[0]
    return choice[best]


def load_stage(params: "Params", run_dir: Path) -> dict[str, Any]:
    """The load stage: validate, QC, split; writes ``load/`` atomically. Returns the summary.

    Cells without a label (:func:`missing_labels`) are split ``excluded`` (empty label in
    ``split.csv``) and counted in the summary's ``missing_labels``. With ``data.split.group_by``
    the split is grouped (:func:`grouped_split`): ``split.csv`` gains a ``group`` column,
    ``groups.csv`` has one row per group (group, split, cells, labels), and the summary says
    ``groups_per_split``, ``missing_groups`` (cells without a group, excluded) and
    ``labels_not_in_train`` (labels whose groups all went to validation or test)."""
    run_dir = Path(run_dir)
    adata = open_backed(params.data_path)
    try:
        info = check_dataset(params, adata)
        obs = adata.obs
        genes = gene_table(adata, params)
        key = params.data.label_key
        labels = obs[key].astype("object").where(~missing_labels(obs[key]), None)  # missing: excluded below
        group_by = params.data.split.group_by
        groups = obs[group_by].astype("object").where(~missing_labels(obs[group_by]), None) if group_by else None
    finally:
        adata.file.close()
    qc = compute_qc(params, obs.index.astype(str), genes)
    s = params.data.split
    split = stratified_split(
        labels.astype("string"),
        train=s.train,
        validation=s.validation,
        test=s.test,
        seed=s.seed,
        min_cells=params.data.min_cells_per_class,
        stratify=s.stratify,
        groups=None if groups is None else groups.astype("string"),
        group_by=group_by or "group",
    )
    table = pd.DataFrame(
        {
            "cell_id": obs.index.astype(str),
            "row": np.arange(len(obs)),
            "label": labels.values,
            **({} if groups is None else {"group": groups.values}),
            "split": split.values,
            "total_counts": qc.cells["total_counts"].values,
            "n_genes": qc.cells["n_genes"].values,
        }
    )
    used = table[table.split != "excluded"]
    if used.empty:
        raise DatasetError(
            f"no class of {params.data.label_key!r} has at least {params.data.min_cells_per_class} cells. "
            "Fix: lower data.min_cells_per_class or use another label column."
        )
    excluded = sorted(set(table.label.dropna().astype(str)) - set(used.label.astype(str)))  # no cell used
    label_counts = table.pivot_table(index="label", columns="split", values="row", aggfunc="count", fill_value=0)
    summary = {
        **info,
        "dataset": str(params.data_path),
        "sha256": file_sha256(params.data_path),
        "counts_source": params.data.counts,
        "label_key": params.data.label_key,
        "split_sizes": {k: int(v) for k, v in table.split.value_counts().items()},
        "excluded_labels": excluded,
        "zero_count_cells": int((table.total_counts == 0).sum()),
        "median_total_counts": float(np.median(table.total_counts)),
        "median_genes_per_cell": float(np.median(table.n_genes)),
        "genes_detected": int((qc.genes.n_cells > 0).sum()),
        "group_by": group_by,
    }
    if groups is not None:
        group_table = groups_per_split(table)
        summary["groups_per_split"] = {k: int(v) for k, v in group_table.split.value_counts(sort=False).items()}
        trained = set(used.label[used.split == "train"].astype(str))
        summary["labels_not_in_train"] = sorted(set(used.label.astype(str)) - trained)
        if summary["labels_not_in_train"]:
            log.warning(
                "grouped by %r, no group with label(s) %s went to train: the model cannot learn them",
                group_by,
                ", ".join(summary["labels_not_in_train"]),
            )
    with runs.stage_output(run_dir, "load") as tmp:
        table.to_csv(tmp / SPLIT_FILE, index=False)
        if groups is not None:
            group_table.to_csv(tmp / GROUPS_FILE, index=False)
        qc.genes.to_csv(tmp / "genes.csv")
        label_counts.to_csv(tmp / "label_counts.csv")
        (tmp / QC_FILE).write_text(json.dumps(summary, indent=2))
        _qc_plots(table, tmp / "qc.png")
    runs.update_manifest(run_dir, lambda m: m.update(input={"path": summary["dataset"], "sha256": summary["sha256"]}))
    return summary


def groups_per_split(table: pd.DataFrame) -> pd.DataFrame:
    """One row per group of a grouped split table: group, split, cells (in that split) and
    labels (distinct ones among those cells), in split order. A group none of whose cells is
    used (all of tiny classes or without a label) is ``excluded``, with all its cells."""
    t = table.dropna(subset=["group"]).assign(group=lambda d: d.group.astype(str))
    used = t.split != "excluded"
    kept = t[used | ~t.group.isin(t.group[used])]  # a group's used cells, or all of a wholly excluded one
    out = kept.groupby("group").agg(split=("split", "first"), cells=("row", "size"), labels=("label", "nunique"))
    rank = {s: i for i, s in enumerate((*SPLITS, "excluded"))}
    out = out.reset_index().sort_values(["split", "group"], key=lambda c: c.map(rank) if c.name == "split" else c)
    return out.reset_index(drop=True)


def _qc_plots(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].hist(table.total_counts, bins=50)
    axes[0].set(title="Total counts per cell", xlabel="counts", ylabel="cells")
    axes[1].hist(table.n_genes, bins=50)
    axes[1].set(title="Genes detected per cell", xlabel="genes", ylabel="cells")
    counts = table.groupby(["label", "split"]).size().unstack(fill_value=0)
    counts.plot.barh(stacked=True, ax=axes[2])
    axes[2].set(title="Cells per label and split", xlabel="cells", ylabel="")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_split(run_dir: Path) -> pd.DataFrame:
    d = runs.require_stage_output(run_dir, "load", "load")
    return pd.read_csv(d / SPLIT_FILE, dtype={"cell_id": str, "label": str, "group": str})


def make_demo_dataset(out: Path) -> Path:
    """The demo dataset: scanpy's bundled pbmc68k_reduced with count-like values.

    Its ``.raw.X`` is log-normalised; ``expm1`` of it gives per-10k normalised counts
    (non-negative, what Geneformer's rank encoding needs). Stored as CSR in ``X``.
    """
    import anndata
    import scanpy as sc

    out = Path(out)
    src = sc.datasets.pbmc68k_reduced()
    counts = src.raw.X.tocsr().astype(np.float32)
    counts.data = np.expm1(counts.data)
    obs = src.obs[["bulk_labels", "n_genes", "percent_mito", "n_counts", "phase", "louvain"]].copy()
    var = pd.DataFrame(index=src.raw.var_names.astype(str))
    ad = anndata.AnnData(X=counts, obs=obs, var=var)
    with files.atomic(out) as tmp:
        ad.write_h5ad(tmp)
    return out
