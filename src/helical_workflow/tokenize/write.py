"""Tokens into Arrow shards (Hugging Face ``datasets`` format), and opening them again.

:func:`tokenize_rows` streams rows of an ``.h5ad`` into one ``datasets`` folder: the rows
are split over forked worker processes, each reading chunks (:func:`.read.read_tokens`) and
appending record batches to its own Arrow file as it goes, so memory stays flat whatever the
number of cells. The workers' files then become one folder that ``datasets.load_from_disk``
opens, through the public API only (:func:`save_dataset`: ``Dataset.from_file``,
``concatenate_datasets``, ``save_to_disk``; one more write of the tokens, no more). The folder
is written into a temporary name and renamed into place when complete (:func:`runs.stage_output`).

``input_ids`` are stored as uint16 when every token id fits (Geneformer's vocabularies do;
half the bytes of int32 on disk), else int32 (helical: int64; same values). A stage's output
``tokenized/`` holds one such folder per shard (``shard-0000i-of-0000n``, see
:class:`stages.Shard`), ``labels.json`` and ``gene_coverage.csv``;
:func:`load_tokenized` opens them all as one dataset.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import data as data_mod
from .. import runs, stages
from .rank import GenePlan, RankValueTokenizer, gene_coverage, no_genes_error
from .read import read_tokens

log = logging.getLogger(__name__)

OUTPUT = stages.get("tokenize").output
LABELS_FILE = "labels.json"
SHARD_BYTES = 128 << 20  # at most about this much per Arrow file of a saved dataset (what one process maps)


@dataclass
class TokenizeResult:
    out_dir: Path
    cells: int
    dropped_zero_count: int
    seconds: float
    lengths_hist: np.ndarray
    coverage: dict[str, Any]
    coverage_table: pd.DataFrame
    missing_labels: int = 0  # cells written with a null label (no value in the label column)

    @property
    def cells_per_second(self) -> float:
        return self.cells / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class TokenizeJob:
    """One contiguous piece of work: rows of a file -> one Arrow file."""

    path: str
    counts: str
    rows: np.ndarray  # sorted matrix rows to tokenize
    plan: GenePlan
    tokenizer: RankValueTokenizer
    columns: dict[str, np.ndarray | str]  # per-row metadata aligned with ``rows``, or the obs column to read
    n_counts: np.ndarray | str | None  # obs n_counts aligned with ``rows``, or its obs column, or None
    out_file: str
    features: Any
    chunk_size: int = 2048
    label: str | None = None  # the column of ``columns`` that holds labels (missing ones: null)


def tokenize_rows(
    path: Path,
    out_dir: Path,
    tokenizer: RankValueTokenizer,
    *,
    counts: str,
    ensembl_ids: Sequence,
    gene_names: Sequence[str],
    rows: np.ndarray,
    columns: dict[str, np.ndarray | str],
    n_counts: np.ndarray | str | None,
    workers: int = 1,
    chunk_size: int = 2048,
    dataset_label: str | None = None,
    label: str | None = None,
    coverage: tuple[pd.DataFrame, dict[str, Any]] | None = None,
) -> TokenizeResult:
    """Tokenize ``rows`` of an h5ad into one ``datasets`` folder ``out_dir`` (written atomically).

    ``columns`` are per-row metadata (cell ids, labels, ...): arrays aligned with ``rows``,
    or the name of an obs column (:attr:`data.ObsColumns.NAMES` for obs_names), read chunk by
    chunk; ``n_counts`` likewise. ``label`` names the column of ``columns`` holding labels:
    a missing one (:func:`data.missing_labels`) is written as null and counted. Rows are
    split over ``workers`` processes, each writing one Arrow file of the dataset.
    ``coverage``: the gene coverage when the caller has it already.
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
    workers = max(1, min(workers, -(-len(rows) // max(chunk_size, 1))))  # no more workers than chunks
    parts = [stages.Shard(k, workers).bounds(len(rows)) for k in range(workers)]
    with runs.stage_output(out_dir.parent, out_dir.name) as tmp:  # renamed into place only when complete
        scratch = tmp / ".parts"  # the workers' Arrow files, until save_to_disk has written the dataset
        scratch.mkdir()

        def part(v, a, b):
            return v if v is None or isinstance(v, str) else np.asarray(v)[a:b]

        jobs = [
            TokenizeJob(
                path=str(path),
                counts=counts,
                rows=rows[a:b],
                plan=plan,
                tokenizer=tokenizer,
                columns={c: part(v, a, b) for c, v in columns.items()},
                n_counts=part(n_counts, a, b),
                out_file=str(scratch / f"part-{k:05d}.arrow"),
                features=features,
                chunk_size=chunk_size,
                label=label,
            )
            for k, (a, b) in enumerate(parts)
        ]
        if len(jobs) == 1:
            results = [_run_job(jobs[0])]
        else:
            from .rank import warm_up

            warm_up()  # compiled once here, inherited by the workers
            _FORKED_JOBS[:] = jobs  # inherited by the forked workers: nothing large is pickled
            try:
                with ProcessPoolExecutor(len(jobs), mp_context=get_context("fork")) as ex:
                    results = list(ex.map(_run_forked_job, range(len(jobs))))
            finally:
                _FORKED_JOBS.clear()
        save_dataset(tmp, [Path(j.out_file) for j in jobs], features, processes=len(jobs))
        shutil.rmtree(scratch)
    return TokenizeResult(
        out_dir=out_dir,
        cells=sum(r["cells"] for r in results),
        dropped_zero_count=sum(r["dropped_zero_count"] for r in results),
        seconds=time.perf_counter() - t0,
        lengths_hist=sum(r["lengths_hist"] for r in results),
        coverage=cov,
        coverage_table=cov_table,
        missing_labels=sum(r["missing_labels"] for r in results),
    )


_FORKED_JOBS: list[TokenizeJob] = []


def _run_forked_job(k: int) -> dict[str, Any]:
    return _run_job(_FORKED_JOBS[k])


def _run_job(job: TokenizeJob) -> dict[str, Any]:
    import pyarrow as pa

    rows = job.rows
    cells = dropped = missing_labels = 0
    chunk = job.chunk_size
    schema = job.features.arrow_schema
    lazy = sorted({c for c in [*job.columns.values(), job.n_counts] if isinstance(c, str)})
    lengths_hist = np.zeros(job.tokenizer.input_size + 1, dtype=np.int64)
    work: dict[str, np.ndarray] = {}  # buffers reused from chunk to chunk
    with (
        data_mod.CountsReader(Path(job.path), job.counts) as reader,
        data_mod.ObsColumns(Path(job.path), lazy) as obs,
        pa.OSFile(job.out_file, "wb") as sink,
        pa.ipc.new_stream(sink, schema) as writer,
    ):
        if not reader.sparse:  # a dense block is rows x genes: keep it around 128 MB
            chunk = max(1, min(chunk, (1 << 24) // max(reader.shape[1], 1)))
        for a in range(0, len(rows), chunk):
            rsel = rows[a : a + chunk]
            nc = None if job.n_counts is None else _chunk_values(obs, job.n_counts, a, rsel)
            flat, offsets, kept = read_tokens(reader, rsel, nc, job.tokenizer, job.plan, work)
            lengths = np.diff(offsets).astype(np.int32)
            ids = pa.array(flat.astype(job.tokenizer.token_dtype, copy=False))
            arrays = [pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), ids), pa.array(lengths)]
            for name, c in job.columns.items():
                values = _chunk_values(obs, c, a, rsel)[kept]
                null = data_mod.missing_labels(values) if name == job.label else None
                missing_labels += 0 if null is None else int(null.sum())
                arrays.append(_arrow_column(values, schema.field(name).type, null))
            writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
            cells += int(kept.sum())
            dropped += int((~kept).sum())
            lengths_hist += np.bincount(lengths, minlength=len(lengths_hist))
    return {
        "cells": cells,
        "dropped_zero_count": dropped,
        "lengths_hist": lengths_hist,
        "missing_labels": missing_labels,
    }


def _chunk_values(obs: data_mod.ObsColumns, column: np.ndarray | str, a: int, rows: np.ndarray) -> np.ndarray:
    """A column's values for the chunk ``rows`` (from position ``a`` of the job's rows): read
    from the obs column of that name, or sliced from the array aligned with the job's rows."""
    if isinstance(column, str):
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        v = obs.read(column, lo, hi)
        return v if hi - lo == len(rows) else v[rows - lo]
    return column[a : a + len(rows)]


def _features(extra: dict[str, str], token_dtype: np.dtype):
    from datasets import Features, Sequence, Value

    f = {"input_ids": Sequence(Value(np.dtype(token_dtype).name)), "length": Value("int32")}
    f.update({k: Value(v) for k, v in extra.items()})
    return Features(f)


def _arrow_type(values: np.ndarray | list) -> str:
    kind = np.asarray(values).dtype.kind
    return {"i": "int64", "u": "int64", "f": "float64", "b": "bool"}.get(kind, "string")


def _arrow_column(values: np.ndarray, typ, null: np.ndarray | None = None):
    """One column of a record batch; ``null`` marks the values written as null."""
    import pyarrow as pa

    if null is not None and null.any():
        conv = str if pa.types.is_string(typ) else (lambda v: v)
        return pa.array([None if m else conv(v) for v, m in zip(values.tolist(), null.tolist())], type=typ)
    if pa.types.is_string(typ) and values.dtype.kind != "U":
        values = values.astype(str)  # a missing value (NaN) not marked null becomes 'nan', as pandas' astype(str)
    elif values.dtype == object and not pa.types.is_string(typ):
        values = values.tolist()
    return pa.array(values, type=typ)


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """No ``datasets`` progress bars inside (they would clutter the executed notebooks), restored after."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def save_dataset(out: Path, arrow_files: list[Path], features, processes: int = 2) -> None:
    """The Arrow (stream) files, in order, as one ``datasets`` folder ``out`` (``load_from_disk``).

    Public API only: each file is memory-mapped (``Dataset.from_file``), they are
    concatenated without a copy, and ``save_to_disk`` writes them once more, as Arrow files
    of about :data:`SHARD_BYTES` at most. Pages of a memory-mapped file count in a process's
    RSS once read, so memory stays flat only if no process reads much more than that: up to
    :data:`SHARD_BYTES` in all the copy runs here; beyond, in ``processes`` (at least two)
    worker processes, each mapping one output file's worth at a time.
    """
    from datasets import Dataset, DatasetInfo, concatenate_datasets

    info = DatasetInfo(features=features)
    parts = [Dataset.from_file(str(p), info=info) for p in arrow_files]
    ds = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    large = sum(Path(p).stat().st_size for p in arrow_files) > SHARD_BYTES
    with _quiet_progress():
        ds.save_to_disk(str(out), max_shard_size=SHARD_BYTES, num_proc=max(2, processes) if large else None)


# ------------------------------------------------------------------ opening them again ----


def load_tokenized(run_dir: Path, expected: int | None = None):
    """All shards of a run's tokenized output, concatenated (memory-mapped Arrow).

    ``expected``: the number of shards the run was tokenized in (``tokenize.shards``);
    without it, as many as there are shard folders. A missing shard is an error naming it.
    """
    from datasets import concatenate_datasets, load_from_disk

    d = runs.require_stage_output(run_dir, OUTPUT, "tokenize")
    present = sorted(p.name for p in d.iterdir() if p.is_dir() and p.name.startswith("shard-"))
    if not present:
        raise FileNotFoundError(f"{d} holds no shards. Fix: re-run the tokenize stage.")
    want = [s.name for s in stages.Shard.all(expected or len(present))]
    missing = [w for w in want if w not in present]
    if missing or len(present) != len(want):
        raise FileNotFoundError(
            f"{d} holds {', '.join(present)}; the {len(want)} shard(s) of this run are "
            f"{', '.join(want)} (missing: {', '.join(missing) or 'none'}). "
            "Fix: re-run the missing tokenize shards (all of them if tokenize.shards changed)."
        )
    parts = [load_from_disk(str(d / w)) for w in want]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def read_labels(run_dir: Path) -> dict[str, int]:
    """The label -> id mapping the tokenize stage wrote (``labels.json``)."""
    d = runs.require_stage_output(run_dir, OUTPUT, "tokenize")
    return json.loads((d / LABELS_FILE).read_text())


def split_subset(ds, split: str):
    """The cells of one split (``train``, ``validation``, ``test``) of a tokenized dataset."""
    return ds.select(np.flatnonzero(np.asarray(ds["split"]) == split))
