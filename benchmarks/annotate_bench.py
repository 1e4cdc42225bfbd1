"""Annotation benchmark: ours (``annotate``: prepare -> annotate_shard -> merge -> finish) against helical's path.

helical's path on the same model and cells is what a user of helical writes to get what an annotation
gives (a label per cell and its cell embedding): ``anndata.read_h5ad``, then helical's
``GeneformerFineTuningModel`` (a ``Geneformer`` with the fine-tuning head) ``process_data``,
``get_embeddings`` and ``get_outputs`` (the logits). Ours is :func:`helical_workflow.annotate.annotate`
without the report, step by step: tokenize in backed mode, length-grouped batched inference, the
predictions, embeddings and ``annotated.h5ad`` written out (the model loading happens inside the shard
step, so it is counted in our seconds; helical's model is built before its clock starts).

What was chosen so that 1M cells fit in a benchmark run on a 2-core CPU:

* data: tokenize_bench's 20,000-gene dictionaries (a realistic vocabulary), but **16-48 expressed genes
  per cell** (about 30 tokens a cell; drawn from a skewed gene distribution, count-like values), 5 cell
  types in ``obs["cell_type"]``; written incrementally, cached under ``outputs/bench/annotate/``;
* model: tokenize_bench's **1-layer** Geneformer-shaped BERT (width 256 so that helical's
  ``gf-6L-10M-i2048`` head fits, intermediate 256, input 2048), with helical's classification head for
  the 5 types (random weights, the head scaled so that confidences spread over (0, 1)), packaged with
  ``registry.build_package`` like a fine-tuned run;
* fp32, batch size 64 for both, 1 torch thread for both (``--threads``; on this shared 2-core machine two
  OpenMP threads ran inference 3-4x slower than one whenever another process held a core);
  ``chunk_cells`` 4096, 1 shard.

helical runs on the first size only by default (``--helical-sizes``): its path holds the whole AnnData,
the token lists as Python objects and every cell's embedding in memory, and it runs the masked-LM head
(20k-way vocabulary logits for every token) twice (embeddings, then outputs), so it is far too slow for
100k cells here. Both paths' top labels, top probabilities and embeddings are compared cell for cell
at each size both ran.

Each measurement runs in a fresh process, timed after its imports; peak RSS is the process's VmHWM
(file-backed pages of memory-mapped outputs included); peak anon is the largest anonymous RSS
(``RssAnon``) seen by a sampler thread every 20 ms: the memory that really grows with the cells.

    .venv/kernel/bin/python benchmarks/annotate_bench.py [--sizes 10000,100000,1000000]
        [--helical-sizes 10000] [--batch-size 64] [--threads 1]   (options, on one line)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from common import peak_rss_mb
from tokenize_bench import MODEL, N_GENES, gene_ids, make_dicts

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
WORK = ROOT / "outputs" / "bench" / "annotate"
LABELS = ["T", "B", "NK", "Mono", "DC"]
GENES_PER_CELL = (16, 48)
HEAD_SCALE = 12.0  # random head weights times this: confidences spread over (0, 1)
SAMPLE = 2000  # cells whose embeddings are compared


# ------------------------------------------------------------------ data and model -----


def make_h5ad(path: Path, n_cells: int, seed: int = 0, chunk: int = 20000) -> Path:
    """``n_cells`` cells of GENES_PER_CELL expressed genes each, written incrementally (as tokenize_bench)."""
    if path.exists():
        return path
    import anndata
    import h5py
    import pandas as pd
    import scipy.sparse as sp
    from anndata.io import sparse_dataset, write_elem

    rng = np.random.default_rng(seed)
    p = rng.gamma(0.3, 1.0, N_GENES)  # skewed: some genes are in most cells, most in few
    p /= p.sum()
    lam = rng.gamma(0.6, 2.0, N_GENES)  # per-gene mean expression
    tmp = path.with_suffix(".tmp")
    obs = pd.DataFrame({"cell_type": rng.choice(LABELS, n_cells)}, index=[f"cell{i}" for i in range(n_cells)])
    anndata.AnnData(obs=obs, var=pd.DataFrame(index=gene_ids())).write_h5ad(tmp)
    del obs
    with h5py.File(tmp, "a") as f:
        if "X" in f:
            del f["X"]
        first = True
        for start in range(0, n_cells, chunk):
            r = min(chunk, n_cells - start)
            k = rng.integers(GENES_PER_CELL[0], GENES_PER_CELL[1] + 1, r)
            rows = np.repeat(np.arange(r), k)
            cols = rng.choice(N_GENES, size=len(rows), p=p)
            vals = (1 + rng.poisson(lam[cols])).astype(np.float32)
            block = sp.csr_matrix((vals, (rows, cols)), shape=(r, N_GENES))  # a repeated gene: counts summed
            block.sum_duplicates()
            if first:
                write_elem(f, "X", block)
                first = False
            else:
                sparse_dataset(f["X"]).append(block)
    tmp.replace(path)
    return path


def bench_params(cache: Path):
    from helical_workflow.params import Params

    return Params.model_validate(
        {
            "experiment": "annotate-bench",
            "data": {"path": "unused.h5ad", "label_key": "cell_type", "gene_id_type": "ensembl"},
            "model": {"name": MODEL, "source": "local_tiny", "cache_dir": str(cache)},
        }
    ).model_copy(update={"project_root": str(ROOT)})


def make_package(work: Path) -> Path:
    """A fine-tuned-model package for the generated genes: helical's fine-tuning model over tokenize_bench's
    1-layer BERT, its state dict as fine_tuned.pt, then ``registry.build_package``."""
    from helical_workflow import files, registry

    pkg = work / "package"
    if (pkg / registry.WORKFLOW).is_file():
        return pkg
    import torch

    from helical_workflow import model as model_mod

    cache = work / "models"
    make_dicts(cache)
    params = bench_params(cache)
    torch.manual_seed(0)
    ft = model_mod.load_fine_tuning_model(params, n_classes=len(LABELS), batch_size=8, device="cpu")
    with torch.no_grad():
        ft.fine_tuning_head.linear.weight.mul_(HEAD_SCALE)
    model_dir = work / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.save(ft.state_dict(), model_dir / "fine_tuned.pt")
    (model_dir / "labels.json").write_text(json.dumps({lab: i for i, lab in enumerate(LABELS)}))
    (model_dir / "model_info.json").write_text(
        json.dumps({"model_name": MODEL, "n_classes": len(LABELS), "source": "annotate_bench (random head)"})
    )
    with files.atomic(pkg, directory=True) as tmp:
        registry.build_package(params, model_dir, tmp, validation={})
    return pkg


# ------------------------------------------------------------------ measuring ----------


class MemSampler:
    """Largest RssAnon and RssFile of this process, sampled every ``every`` seconds."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak = every, {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict[str, int]:
        with open("/proc/self/status") as f:
            now = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in self.peak}
        for k, v in now.items():
            self.peak[k] = max(self.peak[k], v)
        return now

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def __enter__(self) -> "MemSampler":
        self.sample()
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.sample()

    def mb(self, key: str) -> float:
        return self.peak[key] / 1024


def run_ours(h5: str, package: str, size: int, bs: int, threads: int, sample: str | None) -> dict:
    import datasets  # noqa: F401  (imports before the clock, as helical's model set-up)
    import pyarrow.parquet  # noqa: F401
    import scipy.special  # noqa: F401
    import torch
    from helical.models.geneformer import GeneformerFineTuningModel  # noqa: F401

    from helical_workflow import annotate as an
    from helical_workflow.tokenize import _kernel

    _kernel.warm_up()
    torch.set_num_threads(threads)
    out = WORK / f"ours-{size}-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    s = an.Settings(
        model=package,
        min_confidence=0.5,
        min_gene_coverage=0.5,
        shards=1,
        chunk_cells=4096,
        batch_size=bs,
        device="cpu",
        precision="fp32",
        outputs=out,
        tracking_uri=f"sqlite:///{out / 'mlflow.db'}",
        cpus=threads,  # annotate_shard sets torch's threads from it
    )
    steps, rss_after = {}, {}
    with MemSampler() as mem:
        t0 = time.perf_counter()
        t = t0
        run_dir, done = an.prepare(h5, s)
        assert not done
        steps["prepare"], t = time.perf_counter() - t, time.perf_counter()
        rss_after["prepare"] = peak_rss_mb()
        summ = an.annotate_shard(run_dir, "0/1")
        steps["shard"], t = time.perf_counter() - t, time.perf_counter()
        rss_after["shard"] = peak_rss_mb()
        merged = an.merge(run_dir)
        steps["merge"], t = time.perf_counter() - t, time.perf_counter()
        rss_after["merge"] = peak_rss_mb()
        an.finish(run_dir)
        dt = time.perf_counter() - t0
    res = {
        "cells": merged["cells"],
        "seconds": dt,
        "cells_per_s": merged["cells"] / dt,
        "peak_rss_mb": peak_rss_mb(),
        "peak_anon_mb": mem.mb("RssAnon"),
        "peak_file_mb": mem.mb("RssFile"),
        "tokenize_s": summ["tokenize_seconds"],
        "predict_s": summ["seconds"] - summ["tokenize_seconds"],
        "steps": steps,
        "vmhwm_after": rss_after,
        "no_tokens": merged["no_tokens"],
        "threads": torch.get_num_threads(),
    }
    if sample:
        preds = an.load_predictions(run_dir)
        ids = {lab: i for i, lab in enumerate(LABELS)}
        rows = _sample_rows(merged["cells"])
        np.savez(
            sample,
            top1=preds["top1_label"].map(ids).fillna(-1).to_numpy(np.int64),
            prob=preds["top1_probability"].to_numpy(np.float64),
            rows=rows,
            emb=np.load(run_dir / an.EMBEDDINGS, mmap_mode="r")[rows],
        )
    shutil.rmtree(out, ignore_errors=True)
    return res


def _sample_rows(n: int) -> np.ndarray:
    return np.sort(np.random.default_rng(0).choice(n, min(SAMPLE, n), replace=False))


def run_helical(h5: str, package: str, bs: int, threads: int, sample: str | None) -> dict:
    """helical's path: read the h5ad, then process_data, get_embeddings and get_outputs of its
    GeneformerFineTuningModel with the package's weights (gene ids given: no symbol mapping)."""
    import anndata
    import torch
    from helical.models.geneformer import GeneformerConfig, GeneformerFineTuningModel

    from helical_workflow.model import cache_only_downloader

    torch.set_num_threads(threads)
    pkg = Path(package)
    vdir = pkg / "base" / ".cache" / "helical" / "models" / "geneformer" / "v1"
    cfg = GeneformerConfig(model_name=MODEL, batch_size=bs, device="cpu")
    cfg.files_config = {
        "model_files_dir": vdir / MODEL,
        "gene_median_path": vdir / "gene_median_dictionary.pkl",
        "token_path": vdir / "token_dictionary.pkl",
        "ensembl_dict_path": vdir / "ensembl_mapping_dict.pkl",
    }
    t_start = time.perf_counter()
    with cache_only_downloader(vdir.parent.parent):
        model = GeneformerFineTuningModel(
            geneformer_config=cfg, fine_tuning_head="classification", output_size=len(LABELS)
        )
    model.load_state_dict(torch.load(pkg / "fine_tuned.pt", map_location="cpu", weights_only=True))
    startup = time.perf_counter() - t_start
    steps = {}
    with MemSampler() as mem:
        t0 = time.perf_counter()
        t = t0
        ad = anndata.read_h5ad(h5)
        ad.var["ensembl_id"] = ad.var_names
        ds = model.process_data(ad, gene_names="ensembl_id")
        steps["process_data"], t = time.perf_counter() - t, time.perf_counter()
        emb = model.get_embeddings(ds)
        steps["get_embeddings"], t = time.perf_counter() - t, time.perf_counter()
        logits = model.get_outputs(ds, silent=True)
        steps["get_outputs"], t = time.perf_counter() - t, time.perf_counter()
        dt = time.perf_counter() - t0
    res = {
        "cells": len(ds),
        "seconds": dt,
        "cells_per_s": len(ds) / dt,
        "peak_rss_mb": peak_rss_mb(),
        "peak_anon_mb": mem.mb("RssAnon"),
        "peak_file_mb": mem.mb("RssFile"),
        "startup_s": startup,
        "steps": steps,
        "threads": torch.get_num_threads(),
    }
    if sample:
        from scipy.special import softmax

        probs = softmax(logits.astype(np.float64), axis=1)
        rows = _sample_rows(len(ds))
        np.savez(sample, top1=probs.argmax(1), prob=probs.max(1), rows=rows, emb=np.asarray(emb)[rows])
    return res


def measure(kind: str, h5: Path, package: Path, size: int, bs: int, threads: int, sample: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--h5", str(h5), "--package", str(package)]
    cmd += ["--size", str(size), "--batch-size", str(bs), "--threads", str(threads)] + (
        ["--sample", str(sample)] if sample else []
    )
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} at {size} cells failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["wall_s"] = time.perf_counter() - t0
    return r


def agreement(ours: Path, ref: Path) -> str:
    a, b = np.load(ours), np.load(ref)
    if len(a["top1"]) != len(b["top1"]):
        return f"cell counts differ: ours {len(a['top1'])}, helical {len(b['top1'])}"
    same = a["top1"] == b["top1"]
    emb = np.abs(a["emb"].astype(np.float64) - b["emb"]).max()
    prob = np.abs(a["prob"] - b["prob"]).max()
    return (
        f"same top label for {same.sum()} of {len(same)} cells ({same.mean():.4%}); "
        f"max |top probability difference| {prob:.2e}; max |embedding difference| {emb:.2e} "
        f"(on {len(a['rows'])} sampled cells)"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000", help="ours at these sizes (cells)")
    ap.add_argument("--helical-sizes", default="10000", help="helical's path too at these sizes (of --sizes)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads, both paths")
    ap.add_argument("--worker", choices=["ours", "helical"])
    ap.add_argument("--h5")
    ap.add_argument("--package")
    ap.add_argument("--size", type=int)
    ap.add_argument("--sample")
    args = ap.parse_args()
    if args.worker == "ours":
        print(json.dumps(run_ours(args.h5, args.package, args.size, args.batch_size, args.threads, args.sample)))
        return
    if args.worker == "helical":
        print(json.dumps(run_helical(args.h5, args.package, args.batch_size, args.threads, args.sample)))
        return

    t_all = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    package = make_package(WORK)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    helical_sizes = {int(s) for s in args.helical_sizes.split(",") if s}
    print(
        f"machine: {os.cpu_count()} cores; genes {N_GENES}, {GENES_PER_CELL[0]}-{GENES_PER_CELL[1]} expressed "
        f"per cell; model {MODEL}-shaped, 1 layer, width 256, {len(LABELS)} labels; fp32, batch size "
        f"{args.batch_size}, {args.threads} torch thread(s); package {package}",
        flush=True,
    )
    rows, notes = [], []
    for size in sizes:
        t0 = time.perf_counter()
        h5 = make_h5ad(WORK / f"cells-{size}.h5ad", size, seed=size)
        print(f"  (generated/cached {h5.name} in {time.perf_counter() - t0:.0f} s)", flush=True)
        both = size in helical_sizes
        s_ours, s_ref = (WORK / f"sample-ours-{size}.npz", WORK / f"sample-helical-{size}.npz") if both else (None,) * 2
        if both:
            r = measure("helical", h5, package, size, args.batch_size, args.threads, s_ref)
            rows.append(("helical process_data+get_embeddings+get_outputs", size, r))
            steps = {k: round(v, 1) for k, v in r["steps"].items()}
            print(f"  helical {size}: {r['seconds']:.1f} s (steps {steps} s)", flush=True)
        r = measure("ours", h5, package, size, args.batch_size, args.threads, s_ours)
        rows.append(("ours annotate (prepare, shard, merge)", size, r))
        steps = {k: round(v, 1) for k, v in r["steps"].items()}
        hwm = {k: round(v) for k, v in r["vmhwm_after"].items()}
        print(
            f"  ours {size}: {r['seconds']:.1f} s (tokenize {r['tokenize_s']:.1f} s, predict {r['predict_s']:.1f} s; "
            f"steps {steps} s; VmHWM MB after each {hwm})",
            flush=True,
        )
        if both:
            notes.append(f"agreement at {size} cells: {agreement(s_ours, s_ref)}")
    ref = {size: r for name, size, r in rows if name.startswith("helical")}
    first = next(iter(ref.values()), None)
    for size in [s for s in sizes if s not in ref]:
        est = f"about {size / first['cells_per_s'] / 60:.0f} min at its measured cells/s, " if first else ""
        notes.append(
            f"helical's path skipped at {size} cells: {est}longer than this whole benchmark should take "
            "(it runs the 20k-way masked-LM head twice per cell, and holds the AnnData, the token lists and "
            "every embedding in memory); --helical-sizes runs it"
        )
    print(
        f"\n{'implementation':48s} {'cells':>9s} {'seconds':>8s} {'cells/s':>9s} {'peak RSS MB':>12s} "
        f"{'peak anon MB':>13s} {'vs helical':>11s}"
    )
    for name, size, r in rows:
        base = ref.get(size) or first
        ratio = f"{r['cells_per_s'] / base['cells_per_s']:.1f}x" if base else "-"
        if base is not None and size not in ref:
            ratio += f" (vs {next(iter(ref))})"
        print(
            f"{name:48s} {size:9d} {r['seconds']:8.1f} {r['cells_per_s']:9.0f} {r['peak_rss_mb']:12.0f} "
            f"{r['peak_anon_mb']:13.0f} {ratio:>11s}"
        )
    ours = {size: r for name, size, r in rows if name.startswith("ours")}
    for a, b in zip(sizes, sizes[1:]):
        ra, rb = ours[a], ours[b]
        print(
            f"ours {a} -> {b} cells: peak RSS {ra['peak_rss_mb']:.0f} -> {rb['peak_rss_mb']:.0f} MB "
            f"({rb['peak_rss_mb'] / ra['peak_rss_mb']:.2f}x), peak anon {ra['peak_anon_mb']:.0f} -> "
            f"{rb['peak_anon_mb']:.0f} MB ({rb['peak_anon_mb'] / ra['peak_anon_mb']:.2f}x), cells/s "
            f"{rb['cells_per_s'] / ra['cells_per_s']:.2f}x"
        )
    for n in notes:
        print(n)
    print(
        f"(seconds count from the call, after imports; ours includes loading the model from the package, helical's "
        f"model was built before its clock ({first['startup_s']:.1f} s); torch threads {rows[0][2]['threads']}; "
        f"peak RSS: VmHWM, file-backed pages of memory-mapped outputs included; peak anon: RssAnon; "
        f"whole benchmark {time.perf_counter() - t_all:.0f} s)"
        if first
        else f"(whole benchmark {time.perf_counter() - t_all:.0f} s)"
    )


if __name__ == "__main__":
    main()
