"""Fine-tuning benchmark: our batched loop (fp32, bf16) against helical's ``GeneformerFineTuningModel.train``.

Same model (a Geneformer-shaped BERT built locally), same tokenized data (the demo run's
pbmc68k_reduced, or synthetic cells at the model's input size), same batch size, one epoch,
measured in this run. Prints cells/s, peak memory and the ratios.

    .venv/kernel/bin/python benchmarks/train_bench.py                       # CPU: small model, demo data
    .venv/kernel/bin/python benchmarks/train_bench.py --gpu --cells 2000    # GPU: gf-6L-10M shape, input 2048
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np
from common import peak_rss_mb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
WORK = ROOT / "outputs" / "bench" / "train"


def synthetic_run(n_cells: int, n_genes: int, input_size: int, layers: int, seed: int = 0) -> tuple[Path, Path]:
    """A run folder with tokenized cells (lengths near input_size) and a Geneformer-shaped model."""
    import torch
    from datasets import Dataset, Features, Sequence, Value
    from transformers import BertConfig, BertForMaskedLM

    tag = f"{n_cells}-{n_genes}-{input_size}-{layers}"
    run_dir, cache = WORK / f"run-{tag}", WORK / f"models-{tag}"
    vdir = cache / ".cache" / "helical" / "models" / "geneformer" / "v1"
    if not (vdir / "gf-6L-10M-i2048" / "training_args.bin").exists():
        vdir.mkdir(parents=True, exist_ok=True)
        ids = [f"ENSG{i:011d}" for i in range(n_genes)]
        token = {"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(ids)}}
        for name, obj in (
            ("token_dictionary.pkl", token),
            ("gene_median_dictionary.pkl", dict.fromkeys(ids, 1.0)),
            ("ensembl_mapping_dict.pkl", {g: g for g in ids}),
        ):
            with open(vdir / name, "wb") as f:
                pickle.dump(obj, f)
        cfg = BertConfig(
            vocab_size=len(token),
            hidden_size=256,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=512,
            max_position_embeddings=2048,
            pad_token_id=0,
            hidden_act="relu",
        )
        torch.manual_seed(0)
        BertForMaskedLM(cfg).save_pretrained(vdir / "gf-6L-10M-i2048")
        torch.save({}, vdir / "gf-6L-10M-i2048" / "training_args.bin")
    shard = run_dir / "tokenized" / "shard-00000-of-00001"
    if not shard.exists():
        rng = np.random.default_rng(seed)
        lo = int(input_size * 0.5) if input_size >= 2048 else 64
        lens = rng.integers(lo, input_size + 1, n_cells)
        labels = rng.integers(0, 10, n_cells)
        ds = Dataset.from_dict(
            {
                "input_ids": [rng.choice(np.arange(2, n_genes + 2), n, replace=False).astype(np.int32) for n in lens],
                "length": lens.astype(np.int32),
                "cell_id": [f"c{i}" for i in range(n_cells)],
                "label": [str(x) for x in labels],
                "label_id": labels,
                "split": ["train"] * n_cells,
            },
            features=Features(
                {
                    "input_ids": Sequence(Value("int32")),
                    "length": Value("int32"),
                    "cell_id": Value("string"),
                    "label": Value("string"),
                    "label_id": Value("int64"),
                    "split": Value("string"),
                }
            ),
        )
        ds.save_to_disk(str(shard))
        (run_dir / "tokenized" / "labels.json").write_text(json.dumps({str(i): i for i in range(10)}))
    return run_dir, cache


def demo_run() -> tuple[Path, Path]:
    """The latest demo run folder (make demo) and its model cache."""
    shards = (ROOT / "outputs" / "demo").glob("*/tokenized/shard-00000-of-00001")
    runs_ = sorted(shards, key=lambda p: p.stat().st_mtime)
    if not runs_:
        sys.exit("no tokenized demo run: run `make demo` first")
    return runs_[-1].parent.parent, ROOT / "outputs" / "models" / "demo"


def params_for(cache: Path, device: str, precision: str, bs: int):
    from helical_workflow.params import GENEFORMER_MODELS, Params, Profile

    p = Params.model_validate(
        {
            "experiment": "bench",
            "data": {"path": "unused.h5ad", "label_key": "x"},
            "model": {"name": "gf-6L-10M-i2048", "source": "local_tiny", "cache_dir": str(cache)},
            "fine_tune": {"epochs": 1, "batch_size": bs, "learning_rate": 1e-4},
        }
    )
    assert "gf-6L-10M-i2048" in GENEFORMER_MODELS
    prof = Profile(
        device=device, gpus=1 if device == "cuda" else 0, precision=precision, batch_size=bs, cpus=os.cpu_count()
    )
    return p.model_copy(update={"profiles": {"cpu": prof}, "project_root": str(ROOT)})


def peak_mem(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def bench_ours(run_dir: Path, cache: Path, device: str, precision: str, bs: int) -> dict:
    import torch

    from helical_workflow import model as model_mod
    from helical_workflow import modeling, train
    from helical_workflow import tokenize as tok

    params = params_for(cache, device, precision, bs)
    ds = tok.load_tokenized(run_dir)
    store = modeling.TokenStore(ds)
    labels = tok.read_labels(run_dir)
    idx = np.nonzero(store.split == "train")[0]
    torch.manual_seed(0)
    model = model_mod.load_fine_tuning_model(params, n_classes=len(labels), batch_size=bs, device=device)
    tmp_run = WORK / f"ours-{precision}-{os.getpid()}"
    tmp_run.mkdir(parents=True, exist_ok=True)
    setup = train.TrainSetup(params, tmp_run, device, precision, bs)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    train.train_loop(setup, model, store, idx, np.zeros(0, np.int64), len(labels))  # no logger: no MLflow
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    import shutil

    shutil.rmtree(tmp_run, ignore_errors=True)
    return {"cells": len(idx), "seconds": dt, "cells_per_s": len(idx) / dt, "peak_mb": peak_mem(device)}


def bench_helical(run_dir: Path, cache: Path, device: str, bs: int) -> dict:
    import torch

    from helical_workflow import model as model_mod
    from helical_workflow import tokenize as tok

    params = params_for(cache, device, "fp32", bs)
    ds = tok.load_tokenized(run_dir)
    train_ds = tok.split_subset(ds, "train")
    labels = tok.read_labels(run_dir)
    torch.manual_seed(0)
    model = model_mod.load_fine_tuning_model(params, n_classes=len(labels), batch_size=bs, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.train(
        train_dataset=train_ds, label="label_id", epochs=1, freeze_layers=0, optimizer_params={"lr": 1e-4}, silent=True
    )
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"cells": len(train_ds), "seconds": dt, "cells_per_s": len(train_ds) / dt, "peak_mb": peak_mem(device)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument(
        "--synthetic",
        action="store_true",
        help="CPU: synthetic cells over a 20k-gene vocabulary, lengths 64-512 (instead of the demo run)",
    )
    ap.add_argument("--cells", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = "cuda" if args.gpu else "cpu"
    if args.gpu:
        run_dir, cache = synthetic_run(args.cells, 20000, 2048, layers=6)
        bs = args.batch_size or 16
    elif args.synthetic:
        run_dir, cache = synthetic_run(args.cells, 20000, 512, layers=2)
        bs = args.batch_size or 10
    else:
        run_dir, cache = demo_run()
        bs = args.batch_size or 10
    if args.one:
        kind, prec = args.one.split(":")
        if kind == "helical":
            r = bench_helical(run_dir, cache, device, bs)
        else:
            r = bench_ours(run_dir, cache, device, prec, bs)
        print(json.dumps(r))
        return
    import subprocess

    runs_ = [("helical train (fp32)", "helical:fp32"), ("ours fp32", "ours:fp32"), ("ours bf16", "ours:bf16")]
    if args.gpu:
        runs_.append(("ours fp16", "ours:fp16"))
    res = {}
    for name, one in runs_:
        cmd = [sys.executable, __file__, "--one", one, "--cells", str(args.cells), "--batch-size", str(bs)]
        cmd += (["--gpu"] if args.gpu else []) + (["--synthetic"] if args.synthetic else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{name}: failed\n{out.stderr[-2000:]}")
            continue
        res[name] = json.loads(out.stdout.strip().splitlines()[-1])
    where = "GPU " + __import__("torch").cuda.get_device_name(0) if args.gpu else f"CPU, {os.cpu_count()} cores"
    print(f"\n{where}; batch size {bs}; data {run_dir}")
    ref = res.get("helical train (fp32)")
    print(f"{'loop':22s} {'cells':>6s} {'seconds':>8s} {'cells/s':>9s} {'peak MB':>9s} {'vs helical':>10s}")
    for name, r in res.items():
        ratio = f"{r['cells_per_s'] / ref['cells_per_s']:.2f}x" if ref else "-"
        print(
            f"{name:22s} {r['cells']:6d} {r['seconds']:8.1f} {r['cells_per_s']:9.1f} {r['peak_mb']:9.0f} {ratio:>10s}"
        )


if __name__ == "__main__":
    main()
