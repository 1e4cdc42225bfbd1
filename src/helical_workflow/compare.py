"""The compare stage: rank a sweep's trials (or this run against the experiment's earlier runs), set the
winner beside the baselines, register it and decide whether it becomes the ``champion``.

Reads only the run folder (``run.json``, each trial's ``model/`` and ``evaluate/``) and MLflow; writes
``compare/``: ``trials.csv`` (ranked), ``summary.json`` (winner, margin, baselines, registry decision),
``curves.png`` (validation curves), ``params.png`` (parameter against metric), ``history.csv`` (earlier runs).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from . import stages, sweep, tracking
from .card import CARD, model_card
from .files import read_json, write_json

if TYPE_CHECKING:
    from .runs import Run

OUTPUT = stages.get("compare").output


def trial_folders(run: "Run") -> list[tuple[int | None, Path]]:
    """(trial index, folder) of every trial; one ``(None, run folder)`` without a sweep."""
    if run.params.sweep is None:
        return [(None, run.dir)]
    return [(k, run.dir / "trials" / str(k)) for k in range(sweep.trial_count(run.params))]


def trial_table(run: "Run") -> pd.DataFrame:
    """One row per trial: outcome, varied parameters, validation and test metrics; ranked by the sweep metric."""
    metric = run.params.sweep.metric if run.params.sweep else "macro_f1"
    overrides = sweep.trials(run.params)
    ft, ev = stages.get("fine_tune"), stages.get("evaluate")
    rows = []
    for k, folder in trial_folders(run):
        shard = None if k is None else ft.shards(run.params)[k]
        recs = [run.record(ft.key(shard)), run.record(ev.key(shard))]
        failed = next((r for r in recs if r.get("status") != "success"), None)
        info = read_json(folder / stages.get("fine_tune").output / "model_info.json")
        test = read_json(folder / stages.get("evaluate").output / "metrics.json")
        val = info.get("validation") or {}
        rows.append(
            {
                "trial": "run" if k is None else k,
                "status": "success" if failed is None else (failed.get("status") or "not run"),
                **(overrides[k] if k is not None else {}),
                f"validation_{metric}": val.get(metric, math.nan),
                "validation_accuracy": val.get("accuracy", math.nan),
                "test_accuracy": test.get("accuracy", math.nan),
                "test_macro_f1": test.get("macro_f1", math.nan),
                "epochs_run": info.get("epochs_run"),
                "best_epoch": info.get("best_epoch"),
                "error": (failed or {}).get("error"),
            }
        )
    table = pd.DataFrame(rows)
    table["_ok"] = table.status == "success"
    table = table.sort_values(["_ok", f"validation_{metric}"], ascending=[False, False], na_position="last")
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.drop(columns="_ok").reset_index(drop=True)


def curves(run: "Run") -> dict[str, pd.DataFrame]:
    """Per trial, its per-epoch history (``history.json``): train loss and validation metrics."""
    out = {}
    for k, folder in trial_folders(run):
        hist = read_json(folder / stages.get("fine_tune").output / "history.json")
        if hist.get("epochs"):
            out["run" if k is None else f"trial {k}"] = pd.DataFrame(hist["epochs"])
    return out


def earlier_runs(run: "Run", current: dict[str, Any] | None = None) -> pd.DataFrame:
    """The experiment's workflow runs in MLflow (not trials), oldest first: test metrics over time. A sweep's
    run shows its best trial's test metrics; this run (still running) shows ``current`` (its winner's)."""
    ml = run.mlflow
    try:
        exp = ml.client.get_experiment_by_name(run.params.experiment)
        found = ml.client.search_runs([exp.experiment_id], max_results=500, order_by=["attributes.start_time ASC"])
    except Exception as e:
        run.warn(f"MLflow ({ml.uri}): listing earlier runs failed: {e}")
        return pd.DataFrame()
    best: dict[str, tuple[float, float]] = {}  # a sweep's run -> its best trial's (macro-F1, accuracy)
    for r in found:
        parent = r.data.tags.get("mlflow.parentRunId")
        f1 = _metric_ending(r.data.metrics, "helical_model_macro_f1")
        if parent and f1 is not None and f1 > best.get(parent, (-1.0, math.nan))[0]:
            best[parent] = (f1, _metric_ending(r.data.metrics, "helical_model_accuracy") or math.nan)
    rows = []
    for r in found:
        if "mlflow.parentRunId" in r.data.tags:
            continue
        m, this = r.data.metrics, r.info.run_id == ml.id
        f1, acc = best.get(r.info.run_id, (math.nan, math.nan))
        row = {
            "run": r.info.run_name,
            "started": pd.Timestamp(r.info.start_time, unit="ms"),
            "status": "this run" if this else r.info.status,
            "test_accuracy": m.get("evaluate.helical_model_accuracy", acc),
            "test_macro_f1": m.get("evaluate.helical_model_macro_f1", f1),
            "this run": this,
        }
        if this and current:
            row.update(test_accuracy=current.get("accuracy", math.nan), test_macro_f1=current.get("macro_f1", math.nan))
        rows.append(row)
    return pd.DataFrame(rows)


def _metric_ending(metrics: dict[str, float], name: str) -> float | None:
    """A trial's evaluate metric (``evaluate.trial-00002-of-00004.<name>``), or the run's own."""
    return next((v for k, v in metrics.items() if k.startswith("evaluate.") and k.endswith(name)), None)


def _plots(table: pd.DataFrame, hist: dict[str, pd.DataFrame], varied: list[str], metric: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, h in hist.items():
        if f"val_{metric}" in h:
            ax.plot(h.epoch, h[f"val_{metric}"], "o-", label=name)
    ax.set(xlabel="epoch", ylabel=f"validation {metric}", title="Validation curves", ylim=(0, 1))
    if hist:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    if varied:
        fig, axes = plt.subplots(1, len(varied), figsize=(4 * len(varied), 3.2), squeeze=False)
        ok = table[table.status == "success"]
        for ax, field in zip(axes[0], varied, strict=True):
            ax.scatter(ok[field], ok[f"validation_{metric}"])
            for _, r in ok.iterrows():
                ax.annotate(str(r.trial), (r[field], r[f"validation_{metric}"]), fontsize=8)
            if "learning_rate" in field:
                ax.set_xscale("log")
            ax.set(xlabel=field, ylabel=f"validation {metric}")
        fig.suptitle("Parameter against the sweep metric")
        fig.tight_layout()
        fig.savefig(out / "params.png", dpi=110)
        plt.close(fig)


def compare_stage(run: "Run") -> dict[str, Any]:
    """Rank, compare with the baselines, register the winner; writes ``compare/``. Returns the summary."""
    params = run.params
    metric = params.sweep.metric if params.sweep else "macro_f1"
    table = trial_table(run)
    ok = table[table.status == "success"]
    if ok.empty:
        raise RuntimeError(
            "no trial succeeded, nothing to compare or register: see each trial's error in trials.csv and its "
            "notebook. Fix: correct the failing setting and re-run the sweep."
        )
    best = ok.iloc[0]
    k = None if best.trial == "run" else int(best.trial)
    winner = run if k is None else run.for_trial(stages.Shard(k, sweep.trial_count(params), "trial"))
    test = read_json(winner.dir / stages.get("evaluate").output / "metrics.json")
    info = read_json(winner.dir / stages.get("fine_tune").output / "model_info.json")
    score = float(best[f"validation_{metric}"])
    runner_up = float(ok.iloc[1][f"validation_{metric}"]) if len(ok) > 1 else None
    logreg, frozen = test.get("baseline_logreg", {}), test.get("baseline_frozen", {})
    summary: dict[str, Any] = {
        "metric": f"validation_{metric}",
        "trials": int(len(table)),
        "succeeded": int(len(ok)),
        "failed": int(len(table) - len(ok)),
        "winner": None if k is None else k,
        "winner_overrides": winner.manifest.get("overrides", {}) if k is not None else {},
        "winner_score": score,
        "margin_over_runner_up": None if runner_up is None else score - runner_up,
        "test": {k: test.get(k) for k in ("accuracy", "macro_f1", "accuracy_ci", "macro_f1_ci") if k in test},
        "baseline_logreg": logreg,
        "baseline_frozen": frozen,
        "majority_class_accuracy": test.get("chance_accuracy"),
        "baseline_majority": test.get("baseline_majority") or {"accuracy": test.get("chance_accuracy")},
        "beats_logreg": _beats(test, logreg),
        "beats_frozen": _beats(test, frozen),
    }
    card = model_card(run, winner, info=info, metrics=test)
    summary["registry"] = register_winner(run, winner, info, score, metric, card)
    with run.output("compare") as out:
        (out / CARD).write_text(card[0])
        table.to_csv(out / "trials.csv", index=False)
        history = earlier_runs(run, summary["test"])
        if not history.empty:
            history.to_csv(out / "history.csv", index=False)
        _plots(table, curves(run), sweep.varied(params), metric, out)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    run.update(lambda m: m.update(registry=summary["registry"], winner=summary["winner"]))
    if summary["registry"].get("promoted"):  # what the DAG's docs show as the experiment's champion
        champion = {"run": run.run_id, "trial": summary["winner"], "test": summary["test"], **summary["registry"]}
        write_json(params.champion_file, champion)
    return summary


def _beats(test: dict[str, Any], baseline: dict[str, Any]) -> bool | None:
    if not baseline or test.get("macro_f1") is None or baseline.get("macro_f1") is None:
        return None
    return bool(test["macro_f1"] > baseline["macro_f1"])


def register_winner(
    run: "Run",
    winner: "Run",
    info: dict[str, Any],
    score: float,
    metric: str,
    card: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Log the winner's model to its MLflow run and register it, with its model card (``card``: the Markdown and
    its summary, the version's description); a registry that cannot be reached is a warning in ``run.json`` and
    a decision saying so, never a failed stage."""
    from . import registry

    params = run.params
    uri = tracking.tracking_uri(params)
    card, summary = card or (None, None)
    try:
        model_uri = registry.log_model(
            winner.params,
            winner.dir / stages.get("fine_tune").output,
            mlflow_run_id=winner.mlflow.id,
            tracking_uri=uri,
            validation=info.get("validation") or {},
            card=card,
        )
        return registry.register(
            params,
            model_uri=model_uri,
            metric=f"validation_{metric}",
            value=score,
            promote=params.registry.promote,
            tracking_uri=uri,
            description=summary,
        )
    except Exception as e:
        run.warn(f"registering the winner failed: {type(e).__name__}: {e}")
        return {"promoted": False, "reason": f"not registered: {type(e).__name__}: {e}", "value": score}


def winner_sentence(summary: dict[str, Any]) -> str:
    """Which trial wins, by how much, and whether it beats the baselines: plainly."""
    who = "This run" if summary["winner"] is None else f"Trial {summary['winner']}"
    s = f"{who} wins with {summary['metric']} {summary['winner_score']:.3f}"
    if summary["margin_over_runner_up"] is not None:
        s += f", {summary['margin_over_runner_up']:+.3f} over the runner-up"
    s += f" ({summary['succeeded']} of {summary['trials']} trials succeeded)."
    t, lr = summary["test"], summary["baseline_logreg"]
    if lr.get("macro_f1") is not None and t.get("macro_f1") is not None:
        verdict = "beats" if summary["beats_logreg"] else "does NOT beat"
        s += (
            f" On the test split it {verdict} the logistic-regression baseline on expression "
            f"(macro-F1 {t['macro_f1']:.3f}{_ci(t)} vs {lr['macro_f1']:.3f}{_ci(lr)})."
        )
    fr = summary["baseline_frozen"]
    if fr.get("macro_f1") is not None and t.get("macro_f1") is not None:
        verdict = "beats" if summary["beats_frozen"] else "does NOT beat"
        s += f" Fine-tuning {verdict} logistic regression on the frozen pre-trained embeddings ({fr['macro_f1']:.3f})."
    reason = str(summary["registry"].get("reason") or "").strip()
    if reason:  # the registry's decision, as its own sentence
        s += " Registry: " + reason[0].upper() + reason[1:] + ("" if reason.endswith(".") else ".")
    return s


def _ci(scores: dict[str, Any], metric: str = "macro_f1") -> str:
    """``, 95 % CI 0.41–0.63`` when the scores carry the interval (evaluate's bootstrap), else nothing."""
    ci = scores.get(f"{metric}_ci")
    return f", 95 % CI {ci[0]:.3f}–{ci[1]:.3f}" if ci else ""


def baselines_table(summary: dict[str, Any]) -> pd.DataFrame:
    rows = {
        "fine-tuned Geneformer (winner)": summary["test"],
        "logistic regression (expression)": summary["baseline_logreg"],
        "logistic regression (frozen embeddings)": summary["baseline_frozen"],
        "majority class": summary["baseline_majority"],
    }
    table = {}
    for k, v in rows.items():
        row = {"accuracy": v.get("accuracy", np.nan), "macro_f1": v.get("macro_f1", np.nan)}
        if v.get("macro_f1_ci"):
            row["macro_f1 95% CI"] = "{:.3f} – {:.3f}".format(*v["macro_f1_ci"])
        table[k] = row
    return pd.DataFrame(table).T
