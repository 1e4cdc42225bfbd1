"""The fine-tune stage.

``fine_tune.implementation: helical`` calls helical's
``GeneformerFineTuningModel.train`` as it is (fp32, fixed order, one scheduler step per
epoch): the reference implementation. The model and its label mapping are saved in
``model/`` and logged to MLflow.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import model as model_mod
from . import runs, tracking
from . import tokenize as tok

if TYPE_CHECKING:
    from .params import Params

log = logging.getLogger(__name__)

OUTPUT = "model"
WEIGHTS = "fine_tuned.pt"


def batch_size(params: "Params", stage: str) -> int:
    section = params.fine_tune if stage == "fine_tune" else params.evaluate
    return section.batch_size or params.profile_for(stage).batch_size


def device_for(params: "Params", stage: str) -> str:
    dev = params.profile_for(stage).device
    if dev == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(
                f"the resource profile of stage '{stage}' asks for a GPU (device: cuda) but none is visible. "
                "Fix: run on a GPU host or choose a CPU profile (profile / stage_profiles in the params file)."
            )
    return dev


def macro_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    if len(y_true) == 0:
        return {}
    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0))}


def fine_tune_stage(params: "Params", run_dir: Path) -> dict[str, Any]:
    import torch

    run_dir = Path(run_dir)
    ds = tok.load_tokenized(run_dir, expected=params.tokenize.shards)
    labels = tok.read_labels(run_dir)
    train_ds = tok.split_subset(ds, "train")
    val_ds = tok.split_subset(ds, "validation")
    if len(train_ds) == 0:
        raise ValueError("the training split is empty. Fix: check data.split fractions and min_cells_per_class.")
    device = device_for(params, "fine_tune")
    bs = batch_size(params, "fine_tune")
    torch.manual_seed(params.model.seed)
    model = model_mod.load_fine_tuning_model(params, n_classes=len(labels), batch_size=bs, device=device)
    ft = params.fine_tune

    t0 = time.perf_counter()
    model.train(
        train_dataset=train_ds,
        label="label_id",
        epochs=ft.epochs,
        optimizer_params={"lr": ft.learning_rate},
        freeze_layers=ft.freeze_layers,
        validation_dataset=val_ds if len(val_ds) else None,
    )
    seconds = time.perf_counter() - t0
    summary: dict[str, Any] = {
        "implementation": ft.implementation,
        "device": device,
        "precision": "fp32",
        "epochs": ft.epochs,
        "batch_size": bs,
        "train_cells": len(train_ds),
        "validation_cells": len(val_ds),
        "seconds": seconds,
        "train_cells_per_second": ft.epochs * len(train_ds) / seconds,
    }
    if len(val_ds):
        logits = model.get_outputs(val_ds, silent=True)
        summary["validation"] = macro_scores(np.asarray(val_ds["label_id"]), logits.argmax(1))

    with runs.stage_output(run_dir, OUTPUT) as tmp:
        torch.save(model.state_dict(), tmp / WEIGHTS)
        (tmp / "labels.json").write_text(json.dumps(labels, indent=2))
        info = {"model_name": params.model.name, "n_classes": len(labels), "source": params.model.source,
                "base_model_dir": str(model_mod.model_paths(params)["model_files_dir"]), **summary}
        (tmp / "model_info.json").write_text(json.dumps(info, indent=2))
    tracking.log_artifacts(params, run_dir, run_dir / OUTPUT, "model")
    return summary


def load_trained(params: "Params", run_dir: Path, *, batch_size: int, device: str):
    """The fine-tuned model of a run, and its label mapping."""
    import torch

    d = runs.require_stage_output(run_dir, OUTPUT, "fine_tune")
    labels = json.loads((d / "labels.json").read_text())
    model = model_mod.load_fine_tuning_model(params, n_classes=len(labels), batch_size=batch_size, device=device)
    state = torch.load(d / WEIGHTS, map_location=device, weights_only=True)
    model.load_state_dict(state)
    # no model.eval(): helical's fine-tuning model overrides nn.Module.train; get_outputs sets eval mode
    return model, labels
