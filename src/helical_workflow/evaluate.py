"""The evaluate stage: predictions, logits, embeddings, metrics and plots on the test split."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
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


CI_LEVEL = 0.95


def bootstrap_intervals(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    n_classes: int,
    *,
    resamples: int = 1000,
    seed: int = 0,
    groups: np.ndarray | None = None,
    level: float = CI_LEVEL,
) -> dict[str, Any]:
    """Percentile-bootstrap intervals of accuracy, macro-F1 and each class's F1: ``resamples`` draws of the test
    cells with replacement (with ``groups``, of whole groups: donors or samples, as the split kept them). The
    same ``seed`` gives the same intervals. Macro-F1 averages, as sklearn does, the classes present in the draw's
    truth or predictions; a class absent from a draw's truth and predictions gives no F1 for that draw.

    Returns ``{"accuracy_ci": [lo, hi], "macro_f1_ci": [lo, hi], "f1_ci": [[lo, hi] per class]}`` (``None`` for
    a class with no draw)."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    n, k = len(y_true), int(n_classes)
    if n == 0 or resamples < 1:
        return {}
    rng = np.random.default_rng(seed)
    if groups is None:
        draws = rng.integers(0, n, size=(resamples, n))
        weights = np.zeros((resamples, n), dtype=np.int64)
        np.add.at(weights, (np.arange(resamples)[:, None], draws), 1)
    else:  # whole groups: a cell's weight is how often its group was drawn
        codes, uniq = pd.factorize(pd.Series(groups).astype(str))
        g = len(uniq)
        drawn = np.zeros((resamples, g), dtype=np.int64)
        np.add.at(drawn, (np.arange(resamples)[:, None], rng.integers(0, g, size=(resamples, g))), 1)
        weights = drawn[:, codes]
    cell = y_true * k + y_pred  # each cell's (true, predicted) pair
    conf = np.zeros((resamples, k * k), dtype=np.int64)
    for c in np.unique(cell):  # the confusion matrix of every draw at once
        conf[:, c] = weights[:, cell == c].sum(1)
    conf = conf.reshape(resamples, k, k)
    total = conf.sum((1, 2))
    tp = np.diagonal(conf, axis1=1, axis2=2)
    true_n, pred_n = conf.sum(2), conf.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = tp.sum(1) / total
        present = (true_n + pred_n) > 0
        f1 = np.where(present, 2 * tp / np.maximum(true_n + pred_n, 1), np.nan)
        macro = np.nansum(f1, 1) / np.maximum(present.sum(1), 1)
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2

    def interval(x: np.ndarray) -> list[float] | None:
        x = x[np.isfinite(x)]
        return [float(np.percentile(x, lo)), float(np.percentile(x, hi))] if len(x) else None

    return {
        "accuracy_ci": interval(acc),
        "macro_f1_ci": interval(macro),
        "f1_ci": [interval(f1[:, j]) for j in range(k)],
    }


@dataclass(frozen=True)
class Intervals:
    """How an evaluation's intervals are drawn: ``resamples`` bootstrap draws seeded by ``seed``, of whole groups
    when ``group_of`` (cell id -> group, a grouped split) is given, else of cells."""

    resamples: int
    seed: int
    group_of: dict[str, str] | None = None

    def of(self, y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, cell_ids: Sequence[str]) -> dict[str, Any]:
        """:func:`bootstrap_intervals` of these cells (``cell_ids``: their ids, in the order of ``y_true``)."""
        groups = None if self.group_of is None else np.asarray([self.group_of.get(str(c), "") for c in cell_ids])
        return bootstrap_intervals(y_true, y_pred, n_classes, resamples=self.resamples, seed=self.seed, groups=groups)


def scores(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    n_classes: int,
    ci: Intervals | None = None,
    cell_ids: Sequence[str] = (),
) -> dict[str, Any]:
    """Accuracy and macro-F1, each with its 95 % interval when ``ci`` is given."""
    out = modeling.macro_scores(y_true, y_pred)
    if out and ci:
        b = ci.of(y_true, y_pred, n_classes, cell_ids)
        out.update(accuracy_ci=b["accuracy_ci"], macro_f1_ci=b["macro_f1_ci"])
    return out


def expression_baseline(
    params: "Params", run_dir: Path, names: list[str], ci: Intervals | None = None
) -> dict[str, Any]:
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
    return scores(y[~is_train], pred, len(names), ci, order.loc[~is_train, "cell_id"].tolist())


def frozen_embedding_baseline(
    params: "Params", run_dir: Path, n_classes: int, ci: Intervals | None = None
) -> dict[str, Any]:
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
    test_ids = [store.cell_id[i] for i in test_idx]
    return scores(store.labels[test_idx], clf.predict(emb[len(train_idx) :]), n_classes, ci, test_ids)


def evaluate_stage(params: "Params", run_dir: Path) -> dict[str, Any]:
    import scipy.special

    run_dir = Path(run_dir)
    modeling.deterministic(params)
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
    # 95 % intervals for the model and every baseline, on the same test cells (and groups)
    ci = interval_settings(params, run_dir)
    if ci:
        b = ci.of(y_true, y_pred, len(names), cell_ids)
        metrics.update(accuracy_ci=b["accuracy_ci"], macro_f1_ci=b["macro_f1_ci"])
        for name, interval in zip(names, b["f1_ci"]):
            metrics["per_class"][name]["f1_ci"] = interval
        over = f"groups ({params.data.split.group_by})" if ci.group_of is not None else "test cells"
        metrics["intervals"] = {
            "method": f"percentile bootstrap over {over}",
            "resamples": ci.resamples,
            "level": CI_LEVEL,
            "seed": ci.seed,
        }
    metrics["chance_accuracy"] = float(np.bincount(y_true).max() / len(y_true))
    # the majority class predicted for every cell: a baseline with both metrics (its macro-F1 is not "NaN")
    majority = np.full_like(y_true, np.bincount(y_true).argmax())
    metrics["baseline_majority"] = scores(y_true, majority, len(names), ci, cell_ids)
    metrics["n_cells"] = int(len(y_true))
    metrics["baseline_logreg"] = expression_baseline(params, run_dir, names, ci)
    metrics["baseline_frozen"] = frozen_embedding_baseline(params, run_dir, len(names), ci)
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
        if "intervals" in metrics:
            plot_scores(metrics, tmp / "scores.png")
        if params.evaluate.umap and len(y_true) >= 10:
            plot_umap(np.asarray(embeddings), preds, names, tmp / "umap.png", seed=params.data.split.seed)
    return metrics


MODELS = {  # metrics.json key -> the name in tables and plots
    "": "fine-tuned Geneformer",
    "baseline_logreg": "logistic regression (expression)",
    "baseline_frozen": "logistic regression (frozen embeddings)",
    "baseline_majority": "majority class",
}


def score_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """Accuracy and macro-F1 of the model and each baseline, with their 95 % intervals (``low – high``)."""
    rows = {}
    for key, name in MODELS.items():
        m = metrics.get(key, {}) if key else metrics
        row = {}
        for metric in ("accuracy", "macro_f1"):
            row[metric] = m.get(metric)
            ci = m.get(f"{metric}_ci")
            row[f"{metric} 95% CI"] = f"{ci[0]:.3f} – {ci[1]:.3f}" if ci else ""
        rows[name] = row
    return pd.DataFrame(rows).T


def plot_scores(metrics: dict[str, Any], path: Path) -> None:
    """The model and its baselines, and each class's F1, as points with their 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_class = {n: c for n, c in metrics["per_class"].items() if c.get("f1_ci")}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 1.2 + 0.35 * max(len(per_class), 8)))
    names = list(MODELS.values())
    for j, metric in enumerate(("accuracy", "macro_f1")):
        for i, key in enumerate(MODELS):
            m = metrics.get(key, {}) if key else metrics
            if metric not in m:
                continue
            lo, hi = m.get(f"{metric}_ci") or (m[metric], m[metric])
            y = i + (0.15 if j else -0.15)
            label = ("accuracy", "macro-F1")[j] if i == 0 else None
            xerr = [[m[metric] - lo], [hi - m[metric]]]
            a1.errorbar(m[metric], y, xerr=xerr, fmt="os"[j], color=f"C{j}", capsize=3, label=label)
    a1.set(yticks=range(len(names)), yticklabels=names, xlim=(0, 1), xlabel="test score (95 % interval)")
    a1.invert_yaxis()
    a1.legend(loc="lower right")
    for i, c in enumerate(per_class.values()):
        lo, hi = c["f1_ci"]
        a2.errorbar(c["f1"], i, xerr=[[c["f1"] - lo], [hi - c["f1"]]], fmt="o", color="C2", capsize=3)
    a2.set(yticks=range(len(per_class)), yticklabels=list(per_class), xlim=(0, 1), xlabel="F1 (95 % interval)")
    a2.invert_yaxis()
    a2.set_title("per class (fine-tuned model)")
    method = metrics["intervals"]
    fig.suptitle(
        f"Test scores with {method['level']:.0%} intervals ({method['method']}, {method['resamples']} resamples)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def interval_settings(params: "Params", run_dir: Path) -> Intervals | None:
    """The bootstrap of this evaluation: resamples and seed from the params, and, when the split is grouped, each
    cell's group (``split.csv``), so that whole groups are resampled. None with ``evaluate.ci_resamples: 0``."""
    n = params.evaluate.ci_resamples
    if not n:
        return None
    group_of = None
    if params.data.split.group_by:
        split = data_mod.read_split(run_dir)
        if "group" in split:
            group_of = dict(zip(split["cell_id"].astype(str), split["group"].astype(str)))
    return Intervals(n, params.data.split.seed, group_of)


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
