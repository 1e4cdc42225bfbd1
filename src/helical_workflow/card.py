"""The model card: what a registered model was trained on, how well it does and where it should not be used.

Written when the compare stage registers a model: ``model_card.md`` travels with the model's files (an
artifact of the model version, beside the package) and its summary is the registry version's description.
Everything in it comes from the run folder of the model (pinned params, ``run.json``, the load, tokenize,
fine-tune and evaluate outputs): nothing is recomputed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import stages
from .files import read_json

if TYPE_CHECKING:
    from .runs import Run

CARD = "model_card.md"
WEAKEST = 3  # the classes named as the model's weakest


def _ci(m: dict[str, Any], key: str) -> str:
    ci = m.get(f"{key}_ci")
    return f"{m[key]:.3f} ({ci[0]:.3f}–{ci[1]:.3f})" if ci and m.get(key) is not None else _num(m.get(key))


def _num(v: Any) -> str:
    return "—" if v is None else f"{v:.3f}"


def limits(params: Any, coverage: float | None, weakest: list[tuple[str, float]]) -> list[str]:
    """Intended use and limits, from what the run knows about itself."""
    out = []
    if params.model.source == "local_tiny":
        out.append(
            "**Random-initialised demo model** (a small Geneformer-shaped network built locally, not pre-trained "
            "weights): for testing the workflow only, not for biological conclusions."
        )
    out.append(
        f"Labels only from `{params.data.label_key}` of the training data: a cell of another type gets the closest "
        "of these labels (use `annotate.min_confidence` to leave uncertain cells `unassigned`)."
    )
    out.append(
        f"Inputs must use the model's gene identifiers ({params.data.gene_id_type}, mapped to its vocabulary); "
        "annotation refuses inputs below `annotate.min_gene_coverage`."
        + (f" The training data covered {coverage:.1%} of its genes." if coverage is not None else "")
    )
    poor = [f"{n} (F1 {f:.2f})" for n, f in weakest if f < 0.5]
    if poor:
        out.append("Unreliable for: " + ", ".join(poor) + ".")
    return out


def model_card(
    run: "Run", winner: "Run", *, info: dict[str, Any], metrics: dict[str, Any], cv: dict[str, Any] | None = None
) -> tuple[str, str]:
    """(the card in Markdown, its summary for the registry's description) of the model of ``winner`` (a run, or
    the winning trial of a sweep) of ``run``: ``info`` is its ``model_info.json``, ``metrics`` its evaluate
    ``metrics.json``."""
    p = winner.params
    load = run.dir / stages.get("load").output
    tokenized = run.dir / stages.get("tokenize").output
    manifest = run.manifest
    data_in = manifest.get("input") or {}
    qc = read_json(load / "qc_summary.json")
    cov = next((read_json(f).get("gene_coverage") for f in sorted(tokenized.glob("summary.*.json"))), None) or {}
    counts = []
    if (load / "label_counts.csv").is_file():
        import pandas as pd

        counts = pd.read_csv(load / "label_counts.csv").to_dict("records")
    per_class = metrics.get("per_class") or {}
    weakest = sorted(((n, c["f1"]) for n, c in per_class.items() if c.get("support")), key=lambda x: x[1])[:WEAKEST]
    ft = p.fine_tune
    lines = [
        f"# Model card: {p.registered_model}",
        "",
        f"Experiment `{p.experiment}`, run `{manifest.get('run_id', run.dir.name)}`"
        + (f", trial {winner.trial.i} ({winner.manifest.get('overrides')})" if winner.trial is not None else "")
        + ".",
        "",
        "## Data",
        "",
        f"- File: `{data_in.get('path', p.data.path)}` (sha256 `{data_in.get('sha256', '?')}`)",
        f"- Cells: {qc.get('n_cells', qc.get('cells', '?'))}; labels from `{p.data.label_key}`"
        + (
            f"; split grouped by `{p.data.split.group_by}` ({qc.get('n_groups', '?')} groups)"
            if p.data.split.group_by
            else "; split by cell (stratified)"
        ),
        f"- Gene coverage: {cov.get('in_vocabulary', '?')} of {cov.get('genes', '?')} genes in the model's "
        f"vocabulary ({cov.get('coverage', 0):.1%})",
        "",
        "| label | train | validation | test |",
        "| --- | --- | --- | --- |",
        *(f"| {r['label']} | {r.get('train', 0)} | {r.get('validation', 0)} | {r.get('test', 0)} |" for r in counts),
        "",
        "## Model and fine-tuning",
        "",
        f"- Base model: `{p.model.name}` ({p.model.source})",
        f"- Fine-tuning: {ft.epochs} epochs at most, learning rate {ft.learning_rate:g}, batch size "
        f"{info.get('batch_size', ft.batch_size)}, {ft.freeze_layers} frozen layers, {info.get('precision', '?')} "
        f"on {info.get('device', '?')}",
        f"- Kept: epoch {info.get('best_epoch', '?')} of {info.get('epochs_run', '?')}"
        + (" (stopped early)" if info.get("stopped_early") else "")
        + f"; validation macro-F1 {_num((info.get('validation') or {}).get('macro_f1'))}",
        "",
        "## Test metrics (95 % intervals)",
        "",
    ]
    method = metrics.get("intervals") or {}
    if method:
        lines += [f"Intervals: {method['method']}, {method['resamples']} resamples, seed {method['seed']}.", ""]
    lines += ["| model | accuracy | macro-F1 |", "| --- | --- | --- |"]
    rows = {
        "fine-tuned model": metrics,
        "logistic regression (expression)": metrics.get("baseline_logreg") or {},
        "logistic regression (frozen embeddings)": metrics.get("baseline_frozen") or {},
        "majority class": metrics.get("baseline_majority") or {},
    }
    lines += [f"| {k} | {_ci(v, 'accuracy')} | {_ci(v, 'macro_f1')} |" for k, v in rows.items() if v]
    lines += ["", "| class | F1 | support |", "| --- | --- | --- |"]
    lines += [f"| {n} | {_ci(c, 'f1')} | {c.get('support')} |" for n, c in per_class.items()]
    if weakest:
        lines += ["", "Weakest classes: " + ", ".join(f"{n} (F1 {f:.3f})" for n, f in weakest) + "."]
    lines += ["", "## Cross-validation", ""]
    lines.append(cv["verdict"] if cv else "None for this model (a single train/validation/test split).")
    lines += ["", "## Intended use and limits", ""]
    lines += [f"- {x}" for x in limits(p, cov.get("coverage"), weakest)]
    lr = metrics.get("baseline_logreg") or {}
    verdict = ""
    if lr.get("macro_f1") is not None and metrics.get("macro_f1") is not None:
        verdict = (
            " It beats logistic regression on expression"
            if metrics["macro_f1"] > lr["macro_f1"]
            else " It does not beat logistic regression on expression"
        ) + f" ({metrics['macro_f1']:.3f} vs {lr['macro_f1']:.3f} test macro-F1)."
    summary = (
        f"{p.model.name} fine-tuned on {Path(str(data_in.get('path', p.data.path))).name} "
        f"({len(per_class)} labels of {p.data.label_key}): test macro-F1 {_ci(metrics, 'macro_f1')}, accuracy "
        f"{_ci(metrics, 'accuracy')}.{verdict}"
        + (" Random-initialised demo model: not for biological conclusions." if p.model.source == "local_tiny" else "")
        + f" See {CARD}."
    )
    return "\n".join(lines) + "\n", summary
