"""The streaming tokenizer: token-identical to helical's TranscriptomeTokenizer, sharding, bad input."""

from __future__ import annotations

import pickle
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from datasets import load_from_disk

from helical_workflow import tokenize as tok
from helical_workflow.data import DatasetError
from helical_workflow.model import write_dictionaries
from helical_workflow.stages import Shard


def make_dicts(tmp: Path, n_genes: int, *, special: bool, seed: int, tie_medians: bool = True) -> Path:
    """Geneformer-style dictionaries over ENSG ids; some medians shared so that ties happen."""
    rng = np.random.default_rng(seed)
    ids = [f"ENSG{i:011d}" for i in range(n_genes)]
    specials = ["<pad>", "<mask>"] + (["<cls>", "<eos>"] if special else [])
    token = {t: i for i, t in enumerate(specials)}
    token.update({g: len(specials) + i for i, g in enumerate(ids)})
    med = rng.choice([0.5, 1.0, 2.0], n_genes) if tie_medians else rng.uniform(0.1, 5, n_genes)
    medians = dict(zip(ids, med.astype(float)))
    mapping = {g: g for g in ids}
    mapping.update({f"SYM{i}": g for i, g in enumerate(ids)})
    return write_dictionaries(tmp / ("v2" if special else "v1"), token=token, medians=medians, mapping=mapping)


def tokenize_ensembl(h5: Path, out: Path, d: Path, **kw):
    """``tokenize_h5ad`` on generated data: the v1 model, genes by Ensembl id in ``var["ensembl_id"]``."""
    return tok.tokenize_h5ad(
        h5, out, model_name="gf-6L-10M-i2048", dict_dir=d, gene_id_type="ensembl", gene_names="ensembl_id", **kw
    )


def make_h5ad(
    path: Path,
    *,
    n_cells: int,
    n_genes: int,
    seed: int,
    dense: bool = False,
    n_counts: bool = False,
    filter_pass: bool = False,
    duplicates: bool = False,
    unmapped: int = 5,
    dtype=np.float32,
    zero_cells: int = 0,
    lognorm: bool = False,
    unsorted: bool = False,
) -> anndata.AnnData:
    rng = np.random.default_rng(seed)
    X = sp.random(
        n_cells, n_genes, density=0.3, format="csr", random_state=seed, data_rvs=lambda k: rng.integers(1, 6, k)
    ).astype(dtype)
    if unsorted:  # same matrix, column indices stored in reverse within each row
        X = sp.csr_matrix(
            (
                np.concatenate([X.data[X.indptr[r] : X.indptr[r + 1]][::-1] for r in range(n_cells)]),
                np.concatenate([X.indices[X.indptr[r] : X.indptr[r + 1]][::-1] for r in range(n_cells)]),
                X.indptr,
            ),
            shape=X.shape,
        )
        assert not X.has_sorted_indices
    if lognorm:  # like pbmc68k_reduced's expm1(raw.X): per-10k normalised, non-integer values
        tot = np.asarray(X.sum(axis=1)).ravel()
        X = sp.csr_matrix(sp.diags(1e4 / tot) @ X)
        X.data = np.expm1(np.log1p(X.data).astype(np.float32)).astype(dtype)
    if zero_cells:
        X = X.tolil()
        X[:zero_cells] = 0
        X = X.tocsr()
        X.eliminate_zeros()
    ids = [f"ENSG{i:011d}" for i in range(n_genes)]
    for j in range(min(unmapped, n_genes)):
        ids[-1 - j] = f"ENSGNOTINDICT{j}"
    if duplicates:
        ids[3] = ids[1]
        ids[7] = ids[5]
    obs = pd.DataFrame({"cell_type": rng.choice(["T", "B", "NK"], n_cells)}, index=[f"cell{i}" for i in range(n_cells)])
    if n_counts:
        obs["n_counts"] = np.asarray(X.sum(axis=1)).ravel() * 1.7 + 3
    if filter_pass:
        obs["filter_pass"] = (rng.random(n_cells) > 0.3).astype(int)
    var = pd.DataFrame({"ensembl_id": ids}, index=[f"gene{j}" for j in range(n_genes)])
    ad = anndata.AnnData(X=X.toarray() if dense else X, obs=obs, var=var)
    ad.write_h5ad(path)
    return ad


def helical_tokens(ad: anndata.AnnData, d: Path, *, input_size: int, special: bool):
    from helical.models.geneformer.geneformer_tokenizer import TranscriptomeTokenizer

    tk = TranscriptomeTokenizer(
        custom_attr_name_dict={"cell_type": "cell_type"},
        model_input_size=input_size,
        special_token=special,
        gene_median_file=d / "gene_median_dictionary.pkl",
        token_dictionary_file=d / "token_dictionary.pkl",
        gene_mapping_file=d / "ensembl_mapping_dict.pkl",
    )
    cells, meta = tk.tokenize_anndata(ad.copy())
    ds = tk.create_dataset(cells, meta)
    return [list(map(int, x)) for x in ds["input_ids"]], list(ds["length"]), list(ds["cell_type"])


CASES = [
    # name, h5ad kwargs, special, input_size
    ("v1-sparse", dict(n_cells=300, n_genes=400, seed=0), False, 2048),
    ("v1-truncated", dict(n_cells=200, n_genes=500, seed=1), False, 64),
    ("v2-special", dict(n_cells=250, n_genes=300, seed=2), True, 4096),
    ("v2-special-truncated", dict(n_cells=120, n_genes=300, seed=3), True, 50),
    ("dense-ncounts", dict(n_cells=150, n_genes=200, seed=4, dense=True, n_counts=True), False, 2048),
    ("filter-pass-duplicates", dict(n_cells=300, n_genes=250, seed=5, filter_pass=True, duplicates=True), False, 2048),
    ("int-counts-ncounts", dict(n_cells=200, n_genes=300, seed=6, dtype=np.int32, n_counts=True), True, 4096),
    ("float64", dict(n_cells=180, n_genes=220, seed=7, dtype=np.float64, duplicates=True), False, 100),
    ("lognorm-values", dict(n_cells=300, n_genes=400, seed=8, lognorm=True), False, 2048),
    ("lognorm-ncounts-v2", dict(n_cells=300, n_genes=400, seed=9, lognorm=True, n_counts=True), True, 4096),
    ("dense-lognorm", dict(n_cells=120, n_genes=300, seed=10, lognorm=True, dense=True), False, 2048),
    # distinct gene medians (as in Geneformer's dictionaries): most cells have no tied values
    ("distinct-medians", dict(n_cells=300, n_genes=400, seed=12, medians="distinct"), False, 2048),
    ("distinct-medians-v2-truncated", dict(n_cells=200, n_genes=500, seed=13, medians="distinct"), True, 100),
    (
        "distinct-medians-filter-ncounts",
        dict(n_cells=300, n_genes=300, seed=14, medians="distinct", filter_pass=True, n_counts=True, dtype=np.float64),
        False,
        2048,
    ),
    ("unsorted-indices", dict(n_cells=150, n_genes=200, seed=15, unsorted=True), False, 2048),
]


@pytest.mark.parametrize("name,kw,special,input_size", CASES, ids=[c[0] for c in CASES])
def test_tokens_identical_to_helical(tmp_path, monkeypatch, name, kw, special, input_size):
    monkeypatch.setattr(tok.write, "SHARD_BYTES", 4_000)  # a dataset saved as many files, by worker processes
    kw = dict(kw)
    d = make_dicts(
        tmp_path, kw["n_genes"], special=special, seed=kw["seed"], tie_medians=kw.pop("medians", "tied") == "tied"
    )
    h5 = tmp_path / "x.h5ad"
    ad = make_h5ad(h5, **kw)
    ref_ids, ref_len, ref_lab = helical_tokens(ad, d, input_size=input_size, special=special)
    model = "gf-12L-38M-i4096" if special else "gf-6L-10M-i2048"
    tk = tok.RankValueTokenizer.from_files(d, input_size=input_size, special_token=special)
    names = list(ad.var["ensembl_id"])
    rows = np.nonzero(ad.obs["filter_pass"].to_numpy() == 1)[0] if "filter_pass" in ad.obs else np.arange(ad.n_obs)
    res = tok.tokenize_rows(
        h5,
        tmp_path / "out",
        tk,
        counts="X",
        ensembl_ids=names,
        gene_names=names,
        rows=rows,
        columns={"cell_type": ad.obs["cell_type"].to_numpy(dtype=object)[rows]},
        n_counts=ad.obs["n_counts"].to_numpy()[rows] if "n_counts" in ad.obs else None,
        workers=2,
        chunk_size=64,
    )
    ours = load_from_disk(str(res.out_dir))
    assert res.cells == len(ref_ids)
    assert [list(x) for x in ours["input_ids"]] == ref_ids
    assert list(ours["length"]) == ref_len
    assert list(ours["cell_type"]) == ref_lab
    assert model  # both model kinds are covered by the cases
    # written by datasets' save_to_disk; the workers' files are gone
    files = sorted(p.name for p in res.out_dir.iterdir())
    n = len(files) - 2
    assert n >= 2 and files == [f"data-{k:05d}-of-{n:05d}.arrow" for k in range(n)] + [
        "dataset_info.json",
        "state.json",
    ]


def test_cli_entry_matches_helical_with_symbols_and_shards(tmp_path):
    """The command-line path: gene symbols mapped through the dictionary, sharded == unsharded."""
    d = make_dicts(tmp_path, 300, special=False, seed=11)
    h5 = tmp_path / "sym.h5ad"
    ad = make_h5ad(h5, n_cells=400, n_genes=300, seed=11, n_counts=True, unmapped=0)
    ad.var.index = [f"SYM{j}" for j in range(300)]
    ad.write_h5ad(h5)
    ref_ids, _, _ = helical_tokens(ad, d, input_size=2048, special=False)
    from helical_workflow.cli import main

    args = ["tokenize", str(h5), "--model", "gf-6L-10M-i2048", "--model-dir", str(d), "--label-key", "cell_type"]
    assert main([*args[:2], str(tmp_path / "all"), *args[2:]]) == 0
    whole = load_from_disk(str(tmp_path / "all"))
    assert [list(x) for x in whole["input_ids"]] == ref_ids
    assert list(whole["cell_id"]) == list(ad.obs_names)
    for i in range(3):
        assert main([*args[:2], str(tmp_path / "sharded"), *args[2:], "--shard", f"{i}/3"]) == 0
    parts = [load_from_disk(str(p)) for p in sorted((tmp_path / "sharded").iterdir())]
    assert [len(p) for p in parts] == [133, 133, 134]  # stages.Shard.bounds
    assert sum(([list(x) for x in p["input_ids"]] for p in parts), []) == ref_ids
    assert sum((list(p["cell_id"]) for p in parts), []) == list(ad.obs_names)


def test_zero_count_cells_are_dropped_and_counted(tmp_path):
    d = make_dicts(tmp_path, 100, special=False, seed=3)
    h5 = tmp_path / "z.h5ad"
    make_h5ad(h5, n_cells=50, n_genes=100, seed=3, zero_cells=4)
    res = tokenize_ensembl(h5, tmp_path / "o", d)
    assert res.cells == 46 and res.dropped_zero_count == 4
    assert "cell0" not in load_from_disk(str(tmp_path / "o"))["cell_id"]


def test_collapse_where_helical_fails(tmp_path):
    """Different ids mapping to one id: helical 2.2.0 raises KeyError; we sum them into one token."""
    d = make_dicts(tmp_path, 20, special=False, seed=0, tie_medians=False)
    mapping = pickle.loads((d / "ensembl_mapping_dict.pkl").read_bytes())
    mapping["ENSGOLD"] = "ENSG00000000002"
    (d / "ensembl_mapping_dict.pkl").write_bytes(pickle.dumps(mapping))
    tk = tok.RankValueTokenizer.from_files(d, input_size=2048, special_token=False)
    ids = [f"ENSG{i:011d}" for i in range(20)]
    ids[5] = "ENSGOLD"
    X = sp.csr_matrix(np.tile(np.arange(1, 21, dtype=np.float32), (3, 1)))
    plan = tk.plan(ids)
    flat, offsets, _ = tk.encode_block(X, plan)
    first = flat[offsets[0] : offsets[1]]
    assert len(first) == 19 and len(set(first.tolist())) == 19  # ENSGOLD summed into ENSG...02
    assert tk.token_dict["ENSG00000000002"] in first


@pytest.mark.parametrize("value,match", [(-1.0, "negative"), (np.nan, "NaN or infinite")])
def test_bad_values(tmp_path, value, match):
    d = make_dicts(tmp_path, 30, special=False, seed=0)
    X = np.ones((5, 30), dtype=np.float32)
    X[2, 3] = value
    ad = anndata.AnnData(X=sp.csr_matrix(X), var=pd.DataFrame(index=[f"ENSG{i:011d}" for i in range(30)]))
    ad.write_h5ad(tmp_path / "b.h5ad")
    with pytest.raises(tok.TokenizeError, match=match):
        tok.tokenize_h5ad(
            tmp_path / "b.h5ad", tmp_path / "o", model_name="gf-6L-10M-i2048", dict_dir=d, gene_id_type="ensembl"
        )
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp*"))


def test_no_mapped_genes_reports_coverage(tmp_path):
    d = make_dicts(tmp_path, 30, special=False, seed=0)
    ad = anndata.AnnData(
        X=sp.csr_matrix(np.ones((4, 6), np.float32)),
        var=pd.DataFrame(index=["Actb", "Gapdh", "Xist", "Cd3e", "Cd19", "Ms4a1"]),
    )
    ad.write_h5ad(tmp_path / "mouse.h5ad")
    with pytest.raises(tok.TokenizeError, match=r"none of the 6 genes .* in vocabulary: 0; examples: Actb, Gapdh"):
        tok.tokenize_h5ad(tmp_path / "mouse.h5ad", tmp_path / "o", model_name="gf-6L-10M-i2048", dict_dir=d)


def test_missing_label_and_broken_file(tmp_path):
    d = make_dicts(tmp_path, 30, special=False, seed=0)
    h5 = tmp_path / "x.h5ad"
    make_h5ad(h5, n_cells=10, n_genes=30, seed=0)
    with pytest.raises(tok.TokenizeError, match="label column 'celltype' is not in obs.*cell_type"):
        tokenize_ensembl(h5, tmp_path / "o", d, label_key="celltype")
    (tmp_path / "t.h5ad").write_bytes(h5.read_bytes()[:2000])
    with pytest.raises(DatasetError, match="truncated"):
        tok.tokenize_h5ad(tmp_path / "t.h5ad", tmp_path / "o", model_name="gf-6L-10M-i2048", dict_dir=d)


def test_stage_streaming_shards_equal_helical_reference_on_demo_data(tmp_path, model_cache):
    """The tokenize stage on pbmc68k: two streamed shards hold exactly helical's tokens."""
    from helical_workflow import data
    from helical_workflow.params import load_params

    from .conftest import demo_params

    results = {}
    for impl, shards in (("helical", 1), ("streaming", 2)):
        p = load_params(
            demo_params(
                tmp_path / impl, model_cache=model_cache, tokenize__implementation=impl, tokenize__shards=shards
            )
        )
        run_dir = tmp_path / impl / "run"
        data.load_stage(p, run_dir)
        for i in range(shards):
            summary = tok.tokenize_stage(p, run_dir, Shard(i, shards) if shards > 1 else None)
            assert summary["gene_coverage"]["in_vocabulary"] == 765
        ds = tok.load_tokenized(run_dir, expected=shards)
        rows = zip(ds["cell_id"], ds["input_ids"], ds["label_id"], ds["split"])
        results[impl] = {c: (list(ids), lab, s) for c, ids, lab, s in rows}
    assert len(results["streaming"]) == 700
    assert results["streaming"] == results["helical"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_compiled_path_equals_general_path(tmp_path, dtype):
    """encode_csr (sort keys, argsort for tied cells) == encode_block, on cells with and without ties."""
    n_genes, n_cells = 600, 400
    d = make_dicts(tmp_path, n_genes, special=True, seed=1, tie_medians=False)
    tk = tok.RankValueTokenizer.from_files(d, input_size=64, special_token=True)
    rng = np.random.default_rng(1)
    X = sp.random(
        n_cells, n_genes, density=0.2, format="csr", random_state=1, data_rvs=lambda k: rng.integers(1, 9, k)
    ).astype(dtype)
    ids = [f"ENSG{i:011d}" for i in range(n_genes)]
    tk.median_dict.update({g: 2.5 for g in ids[20:30]})  # a few genes share a median: some cells tie
    ids[10] = "NOTAGENE"
    plan = tk.plan(ids)
    shared = X[:, 20:30].tocsr()  # a cell where two of these genes have the same count has tied values
    tied_cells = sum(len(np.unique(shared[r].data)) < shared[r].nnz for r in range(n_cells))
    assert 0.02 * n_cells < tied_cells < 0.5 * n_cells, tied_cells
    for rows in (slice(0, 400), slice(0, 40), slice(100, 300)):  # tie-light and ties decided per block
        block = X[rows]
        for selected in (None, rng.random(block.shape[0]) > 0.3):
            for n_counts in (None, rng.uniform(10, 500, block.shape[0])):
                sub = block if selected is None else block[selected]
                nc_sub = None if n_counts is None else n_counts if selected is None else n_counts[selected]
                want = tk.encode_block(sub, plan, nc_sub)
                got = tk.encode_csr(
                    block.indptr.astype(np.int64), block.indices, block.data, plan, n_genes, n_counts, selected
                )
                for w, g in zip(want, got):
                    np.testing.assert_array_equal(w, g)
    # a median dictionary with many repeated values: most cells tie, argsort ranks them
    tk.median_dict.update({g: 1.0 for g in ids[::2]})
    plan = tk.plan(ids)
    want = tk.encode_block(X, plan)
    got = tk.encode_csr(X.indptr.astype(np.int64), X.indices, X.data, plan, n_genes)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w, g)


@pytest.mark.parametrize("layout", ["chunked", "contiguous", "gzip"])
def test_counts_reader_raw_rows(tmp_path, layout):
    """CSR row ranges read straight from the file equal anndata's, whatever the storage layout."""
    from helical_workflow import data

    X = sp.random(500, 300, density=0.1, format="csr", random_state=0, dtype=np.float32)
    ad = anndata.AnnData(X=X)
    kw = {"compression": "gzip"} if layout == "gzip" else {}
    ad.write_h5ad(tmp_path / "x.h5ad", **kw)
    if layout == "contiguous":
        import h5py

        with h5py.File(tmp_path / "x.h5ad", "a") as f:
            for name in ("data", "indices"):
                values = f["X"][name][:]
                del f["X"][name]
                f["X"].create_dataset(name, data=values)  # not chunked
            assert f["X"]["data"].chunks is None
    with data.CountsReader(tmp_path / "x.h5ad", "X") as r:
        work: dict = {}
        for lo, hi in ((0, 500), (17, 18), (100, 433), (499, 500)):
            indptr, indices, values = r.csr_arrays(lo, hi, work)
            ref = X[lo:hi]
            np.testing.assert_array_equal(indptr, ref.indptr)
            np.testing.assert_array_equal(indices, ref.indices)
            np.testing.assert_array_equal(values, ref.data)
        assert (r._raw["data"] is None) == (layout == "gzip")  # compressed data goes through HDF5


def test_obs_columns_read_by_row_range(tmp_path):
    from helical_workflow import data

    obs = pd.DataFrame(
        {
            "cat": pd.Categorical(["a", None, "b", "a", "c"]),
            "num": np.arange(5) * 1.5,
            "text": ["x", "y", "z", "w", "v"],
            "nullable": pd.array([1, None, 3, 4, 5], dtype="Int64"),
        },
        index=[f"c{i}" for i in range(5)],
    )
    anndata.AnnData(X=sp.csr_matrix((5, 2), dtype=np.float32), obs=obs).write_h5ad(tmp_path / "o.h5ad")
    with data.ObsColumns(tmp_path / "o.h5ad", [data.ObsColumns.NAMES, "cat", "num", "text", "nullable"]) as o:
        assert o.n_obs == 5
        assert list(o.read(data.ObsColumns.NAMES, 1, 4)) == ["c1", "c2", "c3"]
        assert [str(v) for v in o.read("cat", 0, 3)] == ["a", "nan", "b"]
        assert list(o.read("num", 2, 5)) == [3.0, 4.5, 6.0]
        assert list(o.read("text", 3, 5)) == ["w", "v"]
        assert [str(v) for v in o.read("nullable", 0, 3)] == ["1", "nan", "3"]


@pytest.mark.parametrize("missing", [None, ""])
def test_cli_reports_cells_without_a_label(tmp_path, caplog, missing):
    """Labels and cell ids are read from obs per chunk; a missing label (NA or empty) is written
    as null and counted, not carried as a label."""
    d = make_dicts(tmp_path, 50, special=False, seed=2)
    h5 = tmp_path / "m.h5ad"
    ad = make_h5ad(h5, n_cells=30, n_genes=50, seed=2)
    ad.obs["cell_type"] = pd.Categorical(["T", missing, "B"] * 10)
    ad.write_h5ad(h5)
    res = tokenize_ensembl(h5, tmp_path / "o", d, label_key="cell_type", chunk_size=7, workers=2)
    ds = load_from_disk(str(res.out_dir))
    assert list(ds["cell_type"]) == ["T", None, "B"] * 10
    assert list(ds["cell_id"]) == list(ad.obs_names)
    assert res.cells == 30 and res.missing_labels == 10
    assert "'cell_type'" in caplog.text and "10 of 30 cells have no label" in caplog.text


@pytest.mark.parametrize("missing", [None, " "])
def test_cli_label_column_without_any_label_is_an_error(tmp_path, missing):
    d = make_dicts(tmp_path, 50, special=False, seed=2)
    h5 = tmp_path / "m.h5ad"
    ad = make_h5ad(h5, n_cells=12, n_genes=50, seed=2)
    ad.obs["cell_type"] = pd.Categorical([missing] * 12, categories=["T"] if missing is None else [missing])
    ad.write_h5ad(h5)
    with pytest.raises(
        DatasetError,
        match=r"label column 'cell_type' of m.h5ad has no value for any of its 12 "
        r"cells .*Fix: pass --label-key with a labelled column",
    ):
        tokenize_ensembl(h5, tmp_path / "o", d, label_key="cell_type")
    assert not (tmp_path / "o").exists()


def test_load_tokenized_names_a_missing_shard(tmp_path):
    d = make_dicts(tmp_path, 50, special=False, seed=2)
    h5 = tmp_path / "m.h5ad"
    make_h5ad(h5, n_cells=40, n_genes=50, seed=2)
    out = tmp_path / "run" / tok.OUTPUT
    for i in (0, 2):
        tokenize_ensembl(
            h5,
            out,
            d,
            shard=Shard(i, 3),
        )
    with pytest.raises(FileNotFoundError, match="missing: shard-00001-of-00003"):
        tok.load_tokenized(tmp_path / "run", expected=3)
    tokenize_ensembl(
        h5,
        out,
        d,
        shard=Shard(1, 3),
    )
    assert len(tok.load_tokenized(tmp_path / "run", expected=3)) == 40


def test_compiled_path_orders_values_closer_than_its_keys(tmp_path):
    """Values equal in the leading bits the sort keys keep (medians 1 + i * 1e-12) are put in
    order by their full values; a zero median (infinite values) goes to numpy's argsort."""
    n_genes = 300
    d = make_dicts(tmp_path, n_genes, special=False, seed=4, tie_medians=False)
    tk = tok.RankValueTokenizer.from_files(d, input_size=2048, special_token=False)
    ids = [f"ENSG{i:011d}" for i in range(n_genes)]
    tk.median_dict.update({g: 1.0 + i * 1e-12 for i, g in enumerate(ids)})
    rng = np.random.default_rng(4)
    X = sp.random(
        200, n_genes, density=0.4, format="csr", random_state=4, data_rvs=lambda k: rng.integers(1, 4, k)
    ).astype(np.float32)
    plan = tk.plan(ids)
    want = tk.encode_block(X, plan)
    got = tk.encode_csr(X.indptr.astype(np.int64), X.indices, X.data, plan, n_genes)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w, g)
    tk.median_dict[ids[7]] = 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        plan = tk.plan(ids)
        want = tk.encode_block(X, plan)
        got = tk.encode_csr(X.indptr.astype(np.int64), X.indices, X.data, plan, n_genes)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w, g)
