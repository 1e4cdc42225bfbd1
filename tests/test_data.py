"""Loading data: backed-mode streaming, QC, split, and a clear error for each kind of bad input."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from helical_workflow import data
from helical_workflow.params import load_params

from .conftest import DEMO_DATA, demo_params


def write_h5ad(path, X, labels=None, obs_columns=None, **kw):
    n = X.shape[0]
    obs = pd.DataFrame(
        {"cell_type": labels if labels is not None else ["a", "b"] * (n // 2) + ["a"] * (n % 2), **(obs_columns or {})},
        index=[f"c{i}" for i in range(n)],
    )
    var = pd.DataFrame(index=[f"G{j}" for j in range(X.shape[1])])
    anndata.AnnData(X=X, obs=obs, var=var, **kw).write_h5ad(path)
    return path


def params_for(tmp_path, model_cache, path, **kw):
    return load_params(
        demo_params(tmp_path, model_cache=model_cache, data__path=str(path), data__label_key="cell_type", **kw)
    )


def assert_load_fails(params, run_dir, match: str) -> None:
    """The load stage stops with a DatasetError matching ``match`` and leaves no ``load/`` behind."""
    with pytest.raises(data.DatasetError, match=match):
        data.load_stage(params, run_dir)
    assert not (run_dir / "load").exists()


def test_counts_reader_streams_rows_without_loading_everything():
    full = anndata.read_h5ad(DEMO_DATA)
    with data.CountsReader(DEMO_DATA, "X") as r:
        assert r.sparse and r.shape == full.shape
        rows = sp.vstack([b for _, b in r.chunks(97)])
    assert (rows != full.X).nnz == 0


def test_dense_and_layer_sources(tmp_path, model_cache):
    X = np.random.default_rng(0).poisson(1.0, (20, 8)).astype(np.float32)
    p = write_h5ad(tmp_path / "d.h5ad", X, layers={"counts": sp.csr_matrix(X * 2)})
    with data.CountsReader(p, "X") as r:
        assert not r.sparse and np.array_equal(r.rows(3, 7).toarray(), X[3:7])
    with data.CountsReader(p, "layer:counts") as r:
        assert np.array_equal(r.rows(0, 20).toarray(), X * 2)
    with pytest.raises(data.DatasetError, match="no count matrix at 'layer:spliced'.*layer:counts"):
        data.CountsReader(p, "layer:spliced")


def test_csc_matrix_gets_a_conversion_hint(tmp_path):
    X = sp.random(10, 6, density=0.5, format="csc", dtype=np.float32, random_state=0)
    p = write_h5ad(tmp_path / "csc.h5ad", X)
    with pytest.raises(data.DatasetError, match="CSC.*to-csr"):
        data.CountsReader(p, "X")


def test_truncated_file_is_reported(tmp_path):
    src = DEMO_DATA.read_bytes()
    bad = tmp_path / "trunc.h5ad"
    bad.write_bytes(src[: len(src) // 3])
    with pytest.raises(data.DatasetError, match="not a readable .h5ad file.*truncated"):
        data.open_backed(bad)


def test_missing_label_column_lists_the_columns(tmp_path, model_cache):
    p = params_for(tmp_path, model_cache, DEMO_DATA)
    with pytest.raises(data.DatasetError, match="'cell_type' is not in adata.obs.*bulk_labels"):
        data.check_dataset(p)


@pytest.mark.parametrize(
    "bad,match", [(-1.0, "negative values"), (np.nan, "NaN or infinite"), (np.inf, "NaN or infinite")]
)
def test_bad_values_stop_the_load_stage(tmp_path, model_cache, bad, match):
    X = np.ones((10, 5), dtype=np.float32)
    X[4, 2] = bad
    p = params_for(tmp_path, model_cache, write_h5ad(tmp_path / "v.h5ad", sp.csr_matrix(X)))
    run_dir = tmp_path / "run"
    with pytest.raises(data.DatasetError, match=match):
        data.load_stage(p, run_dir)
    assert not (run_dir / "load").exists()


def test_empty_dataset(tmp_path, model_cache):
    empty = write_h5ad(tmp_path / "e.h5ad", sp.csr_matrix((0, 5), dtype=np.float32), labels=[])
    p = params_for(tmp_path, model_cache, empty)
    with pytest.raises(data.DatasetError, match="empty"):
        data.check_dataset(p)


def test_split_is_stratified_deterministic_and_excludes_tiny_classes():
    labels = pd.Series(["a"] * 50 + ["b"] * 20 + ["c"] * 1, index=[f"c{i}" for i in range(71)])
    kw = dict(train=0.7, validation=0.15, test=0.15, seed=3, min_cells=2)
    s1, s2 = data.stratified_split(labels, **kw), data.stratified_split(labels, **kw)
    assert s1.equals(s2)
    assert s1[labels == "c"].tolist() == ["excluded"]
    for lab, n in (("a", 50), ("b", 20)):
        counts = s1[labels == lab].value_counts()
        assert counts["test"] == round(n * 0.15) and counts["validation"] == round(n * 0.15)
    assert not s1.equals(data.stratified_split(labels, **{**kw, "seed": 4}))


def test_load_stage_writes_split_and_qc(tmp_path, model_cache):
    p = load_params(demo_params(tmp_path, model_cache=model_cache))
    summary = data.load_stage(p, tmp_path / "run")
    split = data.read_split(tmp_path / "run")
    assert len(split) == 700 and summary["n_labels"] == 10 and summary["missing_labels"] == 0
    assert set(split.split) == {"train", "validation", "test"}
    assert summary["split_sizes"]["test"] == (split.split == "test").sum()
    assert (tmp_path / "run" / "load" / "qc.png").stat().st_size > 1000


@pytest.mark.parametrize("missing", [np.nan, ""])
def test_label_column_without_any_label_is_an_error(tmp_path, model_cache, missing):
    p = params_for(
        tmp_path,
        model_cache,
        write_h5ad(tmp_path / "n.h5ad", sp.csr_matrix(np.ones((6, 4), np.float32)), labels=[missing] * 6),
    )
    assert_load_fails(
        p,
        tmp_path / "run",
        r"label column 'cell_type' of n.h5ad has no value for any of its "
        r"6 cells .*Fix: set data.label_key to a labelled column",
    )


@pytest.mark.parametrize("missing", [None, "", "  "])
def test_cells_without_a_label_are_counted_and_excluded(tmp_path, model_cache, caplog, missing):
    labels = ["a", "b", missing, "a", "b", "a", "b", missing] * 5
    X = sp.csr_matrix(np.random.default_rng(0).poisson(2.0, (40, 6)).astype(np.float32) + 1)
    p = params_for(
        tmp_path, model_cache, write_h5ad(tmp_path / "m.h5ad", X, labels=labels), data__min_cells_per_class=2
    )
    summary = data.load_stage(p, tmp_path / "run")
    split = data.read_split(tmp_path / "run")
    gone = np.array([lab is None or not lab.strip() for lab in labels])
    assert summary["missing_labels"] == 10 and summary["n_labels"] == 2
    assert (split.split[gone] == "excluded").all() and split.label[gone].isna().all()
    assert (split.split[~gone] != "excluded").all()
    assert "'cell_type' of m.h5ad: 10 of 40 cells have no label" in caplog.text


def donor_dataset(path, n_donors=8, seed=0, missing_donor=()):
    """Cells of several types from each of n_donors donors (d0, d1, ...), of different sizes.
    Type 'rare' is in one small donor only; cells at the rows in ``missing_donor`` have none."""
    rng = np.random.default_rng(seed)
    labels, donors = [], []
    for d in range(n_donors):
        n = int(rng.integers(20, 60))
        labels += list(rng.choice(["T", "B", "NK", "mono"], size=n, p=rng.dirichlet(np.ones(4) * 2)))
        labels += ["rare"] * 4 if d == n_donors - 1 else []
        donors += [f"d{d}"] * (len(labels) - len(donors))
    donors = [None if i in missing_donor else g for i, g in enumerate(donors)]
    X = sp.csr_matrix(rng.poisson(2.0, (len(labels), 6)).astype(np.float32) + 1)
    return write_h5ad(path, X, labels=labels, obs_columns={"donor": donors, "batch": ["b0"] * len(labels)})


def test_grouped_split_puts_each_donor_in_one_split(tmp_path, model_cache):
    p = params_for(tmp_path, model_cache, donor_dataset(tmp_path / "g.h5ad"), data__split__group_by="donor")
    summary = data.load_stage(p, tmp_path / "run")
    split = data.read_split(tmp_path / "run")
    assert {"cell_id", "row", "label", "split", "total_counts", "n_genes", "group"} <= set(split.columns)
    assert (split.split != "excluded").all() and (
        split.group == anndata.read_h5ad(p.data_path).obs.donor.to_numpy()
    ).all()
    splits_per_donor = split.groupby("group").split.nunique()
    assert len(splits_per_donor) == 8 and (splits_per_donor == 1).all()  # no donor leaks
    assert set(split.label[split.split == "train"]) == set(split.label)  # 'rare' (one donor) is trained on
    assert summary["group_by"] == "donor" and summary["labels_not_in_train"] == []
    assert summary["n_groups"] == 8 and summary["missing_groups"] == 0
    per_split = summary["groups_per_split"]
    assert set(per_split) == {"train", "validation", "test"} and sum(per_split.values()) == 8
    groups = pd.read_csv(tmp_path / "run" / "load" / data.GROUPS_FILE, dtype={"group": str})
    assert list(groups.columns) == ["group", "split", "cells", "labels"]
    assert groups.set_index("group").split.to_dict() == split.groupby("group").split.first().to_dict()
    assert groups.cells.sum() == len(split) and groups.split.value_counts().to_dict() == per_split
    # deterministic for a seed
    data.load_stage(p, tmp_path / "again")
    assert data.read_split(tmp_path / "again").split.equals(split.split)


def test_grouped_split_is_close_to_the_fractions_and_follows_the_seed():
    rng = np.random.default_rng(7)
    sizes = rng.integers(10, 200, 60)
    groups = pd.Series(np.repeat([f"s{i}" for i in range(60)], sizes))
    labels = pd.Series(rng.choice(list("abcdef"), size=len(groups)))
    kw = dict(train=0.6, validation=0.2, test=0.2, min_cells=2, groups=groups, group_by="sample")
    s1 = data.stratified_split(labels, seed=1, **kw)
    assert s1.equals(data.stratified_split(labels, seed=1, **kw))
    assert not s1.equals(data.stratified_split(labels, seed=2, **kw))
    assert (pd.crosstab(groups, s1) > 0).sum(axis=1).eq(1).all()
    share = s1.value_counts(normalize=True)
    assert abs(share["train"] - 0.6) < 0.03 and abs(share["validation"] - 0.2) < 0.03
    per_label = pd.crosstab(labels, s1, normalize="index")
    assert (per_label["test"] - 0.2).abs().max() < 0.05  # stratified as far as the groups allow
    # validation: 0 leaves it empty; two groups are then enough
    two = pd.Series(["x"] * 5 + ["y"] * 5)
    s = data.stratified_split(labels[:10], train=0.8, validation=0, test=0.2, seed=0, min_cells=1, groups=two)
    assert set(s) == {"train", "test"} and (pd.crosstab(two, s) > 0).sum(axis=1).eq(1).all()


def test_missing_group_column_lists_the_columns(tmp_path, model_cache):
    p = params_for(tmp_path, model_cache, donor_dataset(tmp_path / "g.h5ad"), data__split__group_by="patient")
    assert_load_fails(
        p,
        tmp_path / "run",
        r"data.split.group_by: column 'patient' is not in adata.obs of g.h5ad "
        r"\(columns: cell_type, donor, batch\)",
    )


def test_too_few_groups_for_the_splits_is_an_error(tmp_path, model_cache):
    path = donor_dataset(tmp_path / "g.h5ad", n_donors=2)
    p = params_for(tmp_path, model_cache, path, data__split__group_by="donor")
    assert_load_fails(
        p,
        tmp_path / "run",
        r"column 'donor' has 2 group\(s\) with usable cells \(d0, d1\), but each of train, validation, "
        r"test needs at least one whole group. Fix: .*set data.split.validation: 0",
    )
    split = {"train": 0.8, "validation": 0.0, "test": 0.2, "group_by": "donor"}
    summary = data.load_stage(params_for(tmp_path, model_cache, path, data__split=split), tmp_path / "run")
    assert summary["groups_per_split"] == {"train": 1, "test": 1}
    with pytest.raises(data.DatasetError, match="column 'batch' has 1 group"):
        data.load_stage(params_for(tmp_path, model_cache, path, data__split__group_by="batch"), tmp_path / "b")


def test_cells_without_a_group_are_counted_and_excluded(tmp_path, model_cache, caplog):
    path = donor_dataset(tmp_path / "g.h5ad", missing_donor={0, 5, 30})
    p = params_for(tmp_path, model_cache, path, data__split__group_by="donor")
    summary = data.load_stage(p, tmp_path / "run")
    split = data.read_split(tmp_path / "run")
    assert summary["missing_groups"] == 3 and summary["split_sizes"]["excluded"] == 3
    assert (
        split.split[split.group.isna()].eq("excluded").all() and split.split[split.group.notna()].ne("excluded").all()
    )
    assert summary["excluded_labels"] == []  # their labels still have cells in the split
    assert "group column 'donor' of g.h5ad: 3 of" in caplog.text
