"""The evaluate stage: predictions, logits, embeddings, metrics and plots on the test split."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from . import data as data_mod
from . import model as model_mod
from . import modeling, runs, stages
from . import tokenize as tok

if TYPE_CHECKING:
    from .params import Params

log = logging.getLogger(__name__)

OUTPUT = stages.get("evaluate").output


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> dict[str, Any]:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    ids = list(range(len(names)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    return {
        **modeling.macro_scores(y_true, y_pred),
        "n_cells": int(len(y_true)),
        "n_classes": len(names),
        "per_class": {
            n: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, n in enumerate(names)
        },
        "confusion_matrix": {"labels": names, "matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist()},
    }


def expression_baseline(params: "Params", run_dir: Path, names: list[str]) -> dict[str, Any]:
    """Logistic regression on log-normalised expression of the same train/test split."""
    import scipy.sparse as sp
    from sklearn.linear_model import LogisticRegression

    split = data_mod.read_split(run_dir)
    label_ids = {n: i for i, n in enumerate(names)}
    keep = split[split.split.isin(["train", "test"])]
    wanted = np.zeros(len(split), dtype=bool)
    wanted[keep["row"].to_numpy()] = True
    blocks = []
    with data_mod.CountsReader(params.data_path, params.data.counts) as r:
        for start, block in r.chunks(params.data.chunk_size):
            sel = np.nonzero(wanted[start : start + block.shape[0]])[0]
            if sel.size:
                blocks.append(block[sel].astype(np.float64))
    X = model_mod.normalize_total(sp.vstack(blocks), log1p=True)
    order = keep.sort_values("row")
    y = order["label"].astype(str).map(label_ids).to_numpy()
    is_train = (order["split"] == "train").to_numpy()
    clf = LogisticRegression(max_iter=2000)
    clf.fit(X[is_train], y[is_train])
    pred = clf.predict(X[~is_train])
    return modeling.macro_scores(y[~is_train], pred)


def frozen_embedding_baseline(params: "Params", run_dir: Path, n_classes: int) -> dict[str, Any]:
    """Logistic regression (as in :func:`expression_baseline`) on the *pre-trained* model's cell embeddings.

    The base model is loaded as fine-tuning starts from it (helical's GeneformerFineTuningModel, untrained
    head) and its cell embedding (the pooled input of the head, what ``embeddings.npy`` holds for the
    fine-tuned model) is computed for the train and test splits: batched, no gradients, on the evaluate
    stage's device and precision. What fine-tuning adds is the difference to the fine-tuned model's scores.
    """
    import torch
    from sklearn.linear_model import LogisticRegression

    device = modeling.device_for(params, "evaluate")
    bs = modeling.batch_size(params, "evaluate")
    store = modeling.TokenStore(tok.load_tokenized(run_dir, expected=params.tokenize.shards))
    train_idx, test_idx = store.indices("train"), store.indices("test")
    if len(train_idx) == 0 or len(test_idx) == 0:
        return {}
    with torch.random.fork_rng(devices=[]):  # the untrained head's initialisation leaves the RNG as it was
        base = model_mod.load_fine_tuning_model(params, n_classes=n_classes, batch_size=bs, device=device)
    _, emb = modeling.predict(
        base,
        store,
        np.concatenate([train_idx, test_idx]),
        batch_size=bs,
        device=device,
        precision=params.profile_for("evaluate").precision,
        pad_id=base.pad_token_id,
    )
    del base
    clf = LogisticRegression(max_iter=2000)
    clf.fit(emb[: len(train_idx)], store.labels[train_idx])
    return modeling.macro_scores(store.labels[test_idx], clf.predict(emb[len(train_idx) :]))


def evaluate_stage(params: "Params", run_dir: Path) -> dict[str, Any]:
    import scipy.special

    run_dir = Path(run_dir)
    device = modeling.device_for(params, "evaluate")
    bs = modeling.batch_size(params, "evaluate")
    model, labels = modeling.load_trained(params, run_dir, batch_size=bs, device=device)
    names = [n for n, _ in sorted(labels.items(), key=lambda kv: kv[1])]
    ds = tok.load_tokenized(run_dir, expected=params.tokenize.shards)
    if params.fine_tune.implementation == "helical":  # helical's own inference path
        test = tok.split_subset(ds, "test")
        if len(test) == 0:
            raise ValueError("the test split is empty. Fix: raise data.split.test or lower min_cells_per_class.")
        logits = model.get_outputs(test, silent=True)
        embeddings = model.get_embeddings(test)
        y_true, cell_ids = np.asarray(test["label_id"]), list(test["cell_id"])
    else:
        store = modeling.TokenStore(ds)
        idx = store.indices("test")
        if len(idx) == 0:
            raise ValueError("the test split is empty. Fix: raise data.split.test or lower min_cells_per_class.")
        profile = params.profile_for("evaluate")
        logits, embeddings = modeling.predict(
            model, store, idx, batch_size=bs, device=device, precision=profile.precision, pad_id=model.pad_token_id
        )
        y_true, cell_ids = store.labels[idx], [store.cell_id[i] for i in idx]
    del model  # the baselines below load their own model
    y_pred = logits.argmax(1)
    probs = scipy.special.softmax(logits, axis=1)
    metrics = classification_metrics(y_true, y_pred, names)
    metrics["chance_accuracy"] = float(np.bincount(y_true).max() / len(y_true))
    # the majority class predicted for every cell: a baseline with both metrics (its macro-F1 is not "NaN")
    metrics["baseline_majority"] = modeling.macro_scores(y_true, np.full_like(y_true, np.bincount(y_true).argmax()))
    metrics["n_cells"] = int(len(y_true))
    metrics["baseline_logreg"] = expression_baseline(params, run_dir, names)
    metrics["baseline_frozen"] = frozen_embedding_baseline(params, run_dir, len(names))
    preds = pd.DataFrame(
        {
            "cell_id": cell_ids,
            "true_label": [names[i] for i in y_true],
            "predicted_label": [names[i] for i in y_pred],
            "confidence": probs.max(1),
        }
    )
    with runs.stage_output(run_dir, OUTPUT) as tmp:
        preds.to_csv(tmp / "predictions.csv", index=False)
        np.save(tmp / "logits.npy", logits.astype(np.float32))
        np.save(tmp / "embeddings.npy", np.asarray(embeddings, dtype=np.float32))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        plot_confusion(metrics["confusion_matrix"], tmp / "confusion_matrix.png")
        if params.evaluate.umap and len(y_true) >= 10:
            plot_umap(np.asarray(embeddings), preds, names, tmp / "umap.png", seed=params.data.split.seed)
    return metrics


def plot_confusion(cm: dict[str, Any], path: Path, cells: str = "test split") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(cm["matrix"], dtype=float)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    n = len(cm["labels"])
    fig, ax = plt.subplots(figsize=(1 + 0.6 * n + 3, 1 + 0.6 * n + 2))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), cm["labels"], rotation=60, ha="right")
    ax.set_yticks(range(n), cm["labels"])
    for i in range(n):
        for j in range(n):
            if m[i, j]:
                ax.text(
                    j,
                    i,
                    int(m[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    ax.set(xlabel="predicted", ylabel="true", title=f"Confusion matrix ({cells}, row-normalised colour)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_umap(embeddings: np.ndarray, preds: pd.DataFrame, names: list[str], path: Path, seed: int = 0) -> None:
    import anndata
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    obs = preds.set_index("cell_id")
    for col in ("true_label", "predicted_label"):  # same categories, so the same colour means the same label
        obs[col] = pd.Categorical(obs[col], categories=names)
    ad = anndata.AnnData(X=embeddings.astype(np.float32), obs=obs)
    cmap = plt.get_cmap("tab20")
    palette = [matplotlib.colors.to_hex(cmap(i % 20)) for i in range(len(names))]
    ad.uns["true_label_colors"] = palette
    ad.uns["predicted_label_colors"] = palette
    sc.pp.neighbors(ad, use_rep="X", n_neighbors=min(15, len(ad) - 1), random_state=seed)
    sc.tl.umap(ad, random_state=seed)
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    sc.pl.umap(ad, color="true_label", ax=axes[0], show=False, title="true label")
    sc.pl.umap(ad, color="predicted_label", ax=axes[1], show=False, title="predicted label")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
