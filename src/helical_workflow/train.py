"""The fine-tune stage.

``fine_tune.implementation``:

* ``batched`` (default): our loop around helical's model and classification head
  (``GeneformerFineTuningModel._forward``, so results stay comparable). Memory-mapped Arrow
  shards, shuffled length-grouped batches with dynamic padding, autocast (bf16 / fp16 with a
  GradScaler / fp32) from the resource profile, gradient accumulation, AdamW with warmup and a
  per-step schedule, gradient clipping, layer freezing, class weights, early stopping on
  validation macro-F1, checkpoints every epoch (and every N steps) that a retry resumes from,
  and data-parallel training (torch DDP) when the profile asks for several processes.
* ``helical``: helical's ``GeneformerFineTuningModel.train`` as it is (fp32, fixed order,
  one scheduler step per epoch): the reference.

The training loop is :func:`train_loop`: batch, autocast, scaler, step and checkpoint are in
one place; what it sets up and what a checkpoint holds are the small helpers around it. Batching,
the classifier module and prediction are in :mod:`helical_workflow.modeling`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import files, modeling, runs, stages
from . import model as model_mod
from . import tokenize as tok
from .modeling import autocast_ctx, collate, set_mode

if TYPE_CHECKING:
    from .params import Params

OUTPUT = stages.get("fine_tune").output
CHECKPOINTS = "checkpoints"
CHECKPOINT_FORMAT = 2  # part of the fingerprint: a checkpoint of another layout is not resumed

EpochLogger = Callable[[dict[str, Any], list[dict[str, Any]]], None]
"""Called on rank 0 after each epoch with the epoch's record and the step-loss entries of that epoch."""


@dataclass
class TrainSetup:
    params: "Params"
    run_dir: Path
    device: str
    precision: str
    batch_size: int
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class Progress:
    """Where training stands: what a checkpoint saves and a retry resumes from."""

    history: list[dict[str, Any]] = field(default_factory=list)  # one record per completed epoch
    steps: list[dict[str, Any]] = field(default_factory=list)  # a loss every log_every_steps optimizer steps
    step: int = 0  # optimizer steps taken
    batch: int = 0  # batches of the current epoch done
    loss_sum: float = 0.0  # and the sum of their losses

    @property
    def epoch(self) -> int:
        """Completed epochs (0-based index of the current one)."""
        return len(self.history)

    @property
    def best_epoch(self) -> int | None:
        """The first epoch with the best validation macro-F1; None without validation."""
        best, f1 = None, -1.0
        for h in self.history:
            if h.get("val_macro_f1", -1.0) > f1 + 1e-9:
                best, f1 = h["epoch"], h["val_macro_f1"]
        return best

    def stop_early(self, patience: int | None) -> bool:
        best = self.best_epoch
        return bool(patience) and best is not None and self.epoch - best >= patience

    def end_epoch(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        self.batch, self.loss_sum = 0, 0.0


# ------------------------------------------------------------------ the loop ------


def train_loop(
    setup: TrainSetup,
    model,
    store: modeling.TokenStore,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    n_classes: int,
    log: EpochLogger | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model`` (helical's GeneformerFineTuningModel) in place; returns the history."""
    import torch

    ft, dev, prec, cuda = setup.params.fine_tune, setup.device, setup.precision, setup.device.startswith("cuda")
    net = _trainable_classifier(model, ft.freeze_layers).to(dev)
    ddp = (
        torch.nn.parallel.DistributedDataParallel(net, device_ids=[torch.device(dev).index] if cuda else None)
        if setup.world > 1
        else None
    )
    forward, pad_id = ddp or net, model.pad_token_id
    trainable = [q for q in net.parameters() if q.requires_grad]
    n_batches = len(_epoch_batches(setup, store, train_idx, epoch=0))  # the same number every epoch
    optimizer, scheduler = _optimizer(ft, trainable, steps_per_epoch=math.ceil(n_batches / ft.gradient_accumulation))
    scaler = torch.amp.GradScaler("cuda", enabled=(prec == "fp16" and cuda))
    loss_fn = torch.nn.CrossEntropyLoss(
        weight=_class_weights(store.labels[train_idx], n_classes, dev) if ft.class_weights else None
    )
    ckpt = Checkpoint(setup, model=net, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    progress = ckpt.resume()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_start, cells_this_attempt = time.perf_counter(), 0
    while progress.epoch < ft.epochs and not progress.stop_early(ft.early_stopping_patience):
        batches = _epoch_batches(setup, store, train_idx, progress.epoch)
        set_mode(model, training=True, encoder_dropout=ft.encoder_dropout)
        bar = _progress_bar(len(batches), progress, ft.epochs, disable=not setup.main)
        t_epoch, cells = time.perf_counter(), 0
        for i in range(progress.batch, len(batches)):
            b = {k: v.to(dev, non_blocking=True) for k, v in collate(store, batches[i], pad_id, pin=cuda).items()}
            update = (i + 1) % ft.gradient_accumulation == 0 or i + 1 == len(batches)  # optimizer step after this batch
            with ddp.no_sync() if ddp and not update else contextlib.nullcontext():  # DDP all-reduces on update only
                with autocast_ctx(dev, prec):
                    logits = forward(b["input_ids"], b["attention_mask"], b["length"])
                    loss = loss_fn(logits.float(), b["labels"])
                scaler.scale(loss / ft.gradient_accumulation).backward()
            if update:
                if ft.max_grad_norm:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(trainable, ft.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                progress.step += 1
            progress.batch, progress.loss_sum = i + 1, progress.loss_sum + float(loss.detach())
            cells += len(batches[i]) * setup.world
            bar.set_postfix(loss=f"{progress.loss_sum / progress.batch:.4f}", refresh=False)
            bar.update(1)
            if update and setup.main and progress.step % ft.log_every_steps == 0:
                progress.steps.append(
                    {
                        "epoch": progress.epoch + 1,
                        "step": progress.step,
                        "loss": float(loss.detach()),
                        "lr": scheduler.get_last_lr()[0],
                    }
                )
            if update and ft.checkpoint_every_steps and progress.step % ft.checkpoint_every_steps == 0:
                ckpt.save(progress)
        bar.close()
        seconds = time.perf_counter() - t_epoch
        record = {
            "epoch": progress.epoch + 1,
            "train_loss": progress.loss_sum / max(progress.batch, 1),
            "lr": scheduler.get_last_lr()[0],
            "seconds": seconds,
            "cells_per_second": cells / max(seconds, 1e-9),
            **_validate(setup, model, store, val_idx),
        }
        if cuda:
            record["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated())
        progress.end_epoch(record)
        if progress.best_epoch == record["epoch"]:
            ckpt.save_best(model)
        if setup.main:
            print(
                " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()), flush=True
            )
            if log is not None:
                log(record, [s for s in progress.steps if s["epoch"] == record["epoch"]])
        ckpt.save(progress)
        cells_this_attempt += cells
    ckpt.restore_best(model, progress.best_epoch)
    return {
        "history": progress.history,
        "steps": progress.steps,
        "best_epoch": progress.best_epoch,
        "stopped_early": progress.stop_early(ft.early_stopping_patience),
        "global_step": progress.step,
        "seconds_this_attempt": time.perf_counter() - t_start,
        "cells_this_attempt": cells_this_attempt,
    }


# ------------------------------------------------------------------ around it -----


def _trainable_classifier(model, freeze_layers: int):
    """helical's classifier, with the first ``freeze_layers`` encoder layers frozen (as helical does)."""
    for layer in model.model.bert.encoder.layer[:freeze_layers]:
        for prm in layer.parameters():
            prm.requires_grad = False
    # the masked-LM head is not used by classification (its decoder weight is the tied word embedding: keep that)
    tied = model.model.bert.embeddings.word_embeddings.weight
    for prm in model.model.cls.parameters():
        if prm is not tied:
            prm.requires_grad = False
    return modeling.classifier(model)


def _optimizer(ft, trainable: list, *, steps_per_epoch: int):
    """AdamW, and a learning-rate schedule stepped once per optimizer step."""
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(trainable, lr=ft.learning_rate, weight_decay=ft.weight_decay)
    total = max(1, steps_per_epoch * ft.epochs)
    return optimizer, get_scheduler(
        ft.scheduler, optimizer=optimizer, num_warmup_steps=int(ft.warmup_ratio * total), num_training_steps=total
    )


def _class_weights(labels: np.ndarray, n_classes: int, device: str):
    """Inverse class frequency (sklearn's 'balanced')."""
    import torch

    counts = np.bincount(labels, minlength=n_classes)
    return torch.tensor(len(labels) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32, device=device)


def _epoch_batches(setup: TrainSetup, store: modeling.TokenStore, idx: np.ndarray, epoch: int) -> list[np.ndarray]:
    """This rank's batches of an epoch (every rank gets the same number)."""
    ft = setup.params.fine_tune
    batches = modeling.make_batches(
        store.lengths,
        idx,
        setup.batch_size,
        seed=setup.params.model.seed,
        epoch=epoch,
        shuffle=ft.shuffle,
        group_by_length=ft.group_by_length,
    )
    return batches[: len(batches) - len(batches) % setup.world][setup.rank :: setup.world]


def _validate(setup: TrainSetup, model, store: modeling.TokenStore, val_idx: np.ndarray) -> dict[str, float]:
    if not len(val_idx):
        return {}
    import torch
    import torch.nn.functional as F

    logits, _ = modeling.predict(
        model,
        store,
        val_idx,
        batch_size=setup.batch_size * 2,
        device=setup.device,
        precision=setup.precision,
        pad_id=model.pad_token_id,
    )
    y = store.labels[val_idx]
    loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y.astype(np.int64))))
    return {"val_loss": loss, **{f"val_{k}": v for k, v in modeling.macro_scores(y, logits.argmax(1)).items()}}


def _progress_bar(total: int, progress: Progress, epochs: int, disable: bool):
    from tqdm.auto import tqdm

    # Airflow logs and papermill capture stdout: few, complete lines; a notebook front end updates in place
    bar = tqdm(
        total=total,
        desc=f"epoch {progress.epoch + 1}/{epochs}",
        disable=disable,
        mininterval=5.0,
        file=sys.stdout,
        dynamic_ncols=False,
        ascii=True,
        leave=True,
    )
    bar.update(progress.batch)
    return bar


def _fingerprint(params: "Params", run_dir: Path) -> str:
    import hashlib

    blob = json.dumps(
        {
            "fine_tune": params.fine_tune.model_dump(mode="json"),
            "model": params.model.model_dump(mode="json"),
            "seed": params.data.split.seed,
            "input": runs.read_manifest(run_dir).get("input", {}),
            "format": CHECKPOINT_FORMAT,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Checkpoint:
    """``checkpoints/last.pt``: the state of ``stateful`` objects, the RNG and the :class:`Progress`, which a
    retry resumes from; ``checkpoints/best.pt``: the weights of the best validation epoch. Rank 0 writes."""

    def __init__(self, setup: TrainSetup, **stateful: Any):
        self.dir = setup.run_dir / CHECKPOINTS
        self.last, self.best = self.dir / "last.pt", self.dir / "best.pt"
        self.setup, self.stateful = setup, stateful
        self.fingerprint = _fingerprint(setup.params, setup.run_dir)

    def resume(self) -> Progress:
        import torch

        if not self.last.exists():
            return Progress()
        ck = torch.load(self.last, map_location="cpu", weights_only=False)
        if ck.get("fingerprint") != self.fingerprint:
            raise RuntimeError(
                f"{self.last} was written with other parameters or data. Fix: remove {self.dir} "
                "(or use a new run id) to train from scratch."
            )
        for name, obj in self.stateful.items():
            obj.load_state_dict(ck[name])
        torch.set_rng_state(ck["torch_rng"])
        if ck.get("cuda_rng") is not None and self.setup.device.startswith("cuda"):
            torch.cuda.set_rng_state(ck["cuda_rng"], self.setup.device)
        progress = Progress(**ck["progress"])
        if self.setup.main:
            print(
                f"resuming from {self.last}: epoch {progress.epoch + 1}, batch {progress.batch}, step {progress.step}"
            )
        return progress

    def save(self, progress: Progress) -> None:
        import torch

        if not self.setup.main:
            return
        dev = self.setup.device
        state = {name: obj.state_dict() for name, obj in self.stateful.items()}
        state.update(
            torch_rng=torch.get_rng_state(),
            progress=asdict(progress),
            fingerprint=self.fingerprint,
            fine_tune=self.setup.params.fine_tune.model_dump(mode="json"),  # the settings this state was trained with
            cuda_rng=torch.cuda.get_rng_state(dev) if dev.startswith("cuda") else None,
        )
        with files.atomic(self.last) as tmp:
            torch.save(state, tmp)

    def save_best(self, model) -> None:
        import torch

        if self.setup.main:
            with files.atomic(self.best) as tmp:
                torch.save(model.state_dict(), tmp)

    def restore_best(self, model, best_epoch: int | None) -> None:
        import torch

        if best_epoch is not None and self.best.exists():
            model.load_state_dict(torch.load(self.best, map_location=self.setup.device, weights_only=True))


def mlflow_logger(params: "Params", run_dir: Path) -> EpochLogger:
    """Each epoch's record as ``fine_tune.*`` metrics (step = epoch), and its step losses as one series.
    (tracking turns an MLflow failure into a warning: it never stops training.)"""

    ml = runs.Run(params, run_dir).mlflow

    def log_epoch(record: dict[str, Any], steps: list[dict[str, Any]]) -> None:
        ml.log_metrics({f"fine_tune.{k}": v for k, v in record.items() if k != "epoch"}, record["epoch"])
        if steps:
            ml.log_series("fine_tune.step_loss", [(s["step"], s["loss"]) for s in steps])

    return log_epoch


def _log_model(params: "Params", run_dir: Path) -> None:
    """``model/`` as MLflow artifacts of the run."""
    runs.Run(params, run_dir).mlflow.log_artifacts(run_dir / OUTPUT, "model")


# ------------------------------------------------------------------ the stage -----


def _prepare(params: "Params", run_dir: Path):
    store = modeling.TokenStore(tok.load_tokenized(run_dir, expected=params.tokenize.shards))
    train_idx, val_idx = store.indices("train"), store.indices("validation")
    if len(train_idx) == 0:
        raise ValueError("the training split is empty. Fix: check data.split fractions and min_cells_per_class.")
    return store, tok.read_labels(run_dir), train_idx, val_idx


def _ddp_worker(rank: int, world: int, params: "Params", run_dir: str, port: int) -> None:
    """One data-parallel process. It gets the very params of the stage (a sweep trial's own, with its overrides),
    never re-read from a file."""
    import torch
    import torch.distributed as dist

    profile = params.profile_for("fine_tune")
    cuda = profile.device == "cuda"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        dev = f"cuda:{rank}" if cuda else "cpu"
        if cuda:
            torch.cuda.set_device(rank)
        torch.set_num_threads(max(1, modeling.cpu_threads(profile.cpus) // world))
        logger = mlflow_logger(params, Path(run_dir)) if rank == 0 else None
        _train_here(params, Path(run_dir), device=dev, rank=rank, world=world, log=logger)  # rank 0 writes model/
    finally:
        dist.destroy_process_group()


def _train_here(
    params: "Params", run_dir: Path, *, device: str, rank: int = 0, world: int = 1, log: EpochLogger | None = None
) -> dict[str, Any]:
    import torch

    store, labels, train_idx, val_idx = _prepare(params, run_dir)
    bs = modeling.batch_size(params, "fine_tune")
    modeling.deterministic(params)
    torch.manual_seed(params.model.seed)
    model = model_mod.load_fine_tuning_model(params, n_classes=len(labels), batch_size=bs, device=device)
    setup = TrainSetup(params, run_dir, device, params.profile_for("fine_tune").precision, bs, rank, world)
    out = train_loop(setup, model, store, train_idx, val_idx, len(labels), log=log)
    if rank == 0:
        _save_model(params, run_dir, model, labels, out)
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fine_tune_stage(params: "Params", run_dir: Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    ft = params.fine_tune
    if ft.implementation == "helical":
        return _fine_tune_with_helical(params, run_dir)
    profile = params.profile_for("fine_tune")
    device = modeling.device_for(params, "fine_tune")
    world = ft.processes or max(1, profile.gpus)
    if profile.device == "cuda" and world > profile.gpus:
        raise RuntimeError(f"fine_tune.processes={world} but the profile has {profile.gpus} GPU(s). Fix: lower it.")
    t0 = time.perf_counter()
    if world == 1:
        import torch

        torch.set_num_threads(modeling.cpu_threads(profile.cpus))
        _train_here(params, run_dir, device=device, log=mlflow_logger(params, run_dir))
    else:
        import torch.multiprocessing as tmp_mp

        method = "spawn" if profile.device == "cuda" else "fork"
        tmp_mp.start_processes(
            _ddp_worker,
            args=(world, params, str(run_dir), _free_port()),
            nprocs=world,
            join=True,
            start_method=method,
        )
    seconds = time.perf_counter() - t0
    info = json.loads((run_dir / OUTPUT / "model_info.json").read_text())
    _log_model(params, run_dir)
    return {**info, "seconds": seconds, "processes": world}


def _save_model(params: "Params", run_dir: Path, model, labels: dict[str, int], out: dict[str, Any]) -> None:
    hist = out["history"]
    last = hist[-1] if hist else {}
    best = next((h for h in hist if h["epoch"] == out["best_epoch"]), last)
    summary = {
        "implementation": params.fine_tune.implementation,
        "device": params.profile_for("fine_tune").device,
        "precision": params.profile_for("fine_tune").precision,
        "epochs_run": len(hist),
        "best_epoch": out["best_epoch"],
        "stopped_early": out["stopped_early"],
        "optimizer_steps": out["global_step"],
        "batch_size": modeling.batch_size(params, "fine_tune"),
        "train_cells_per_second": float(np.mean([h["cells_per_second"] for h in hist])) if hist else None,
        "validation": {k.removeprefix("val_"): v for k, v in best.items() if k in ("val_accuracy", "val_macro_f1")},
    }
    if "peak_gpu_memory_bytes" in last:
        summary["peak_gpu_memory_bytes"] = max(h.get("peak_gpu_memory_bytes", 0) for h in hist)
    _write_model_dir(params, run_dir, model, labels, summary, history={"epochs": hist, "steps": out["steps"]})


def _write_model_dir(
    params: "Params",
    run_dir: Path,
    model,
    labels: dict[str, int],
    summary: dict[str, Any],
    history: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``model/``: weights, label mapping, model_info.json (and the training history), written atomically."""
    import torch

    info = {
        "model_name": params.model.name,
        "n_classes": len(labels),
        "source": params.model.source,
        "base_model_dir": str(model_mod.model_paths(params)["model_files_dir"]),
        **summary,
    }
    with runs.stage_output(run_dir, OUTPUT) as d:
        torch.save(model.state_dict(), d / modeling.WEIGHTS)
        (d / modeling.LABELS).write_text(json.dumps(labels, indent=2))
        if history is not None:
            (d / "history.json").write_text(json.dumps(history, indent=2))
        (d / "model_info.json").write_text(json.dumps(info, indent=2))
    return info


def _fine_tune_with_helical(params: "Params", run_dir: Path) -> dict[str, Any]:
    """The reference: helical's GeneformerFineTuningModel.train, as it is."""
    import torch

    ds = tok.load_tokenized(run_dir, expected=params.tokenize.shards)
    labels = tok.read_labels(run_dir)
    train_ds = tok.split_subset(ds, "train")
    val_ds = tok.split_subset(ds, "validation")
    if len(train_ds) == 0:
        raise ValueError("the training split is empty. Fix: check data.split fractions and min_cells_per_class.")
    device = modeling.device_for(params, "fine_tune")
    bs = modeling.batch_size(params, "fine_tune")
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
        "implementation": "helical",
        "device": device,
        "precision": "fp32",
        "epochs_run": ft.epochs,
        "batch_size": bs,
        "train_cells": len(train_ds),
        "validation_cells": len(val_ds),
        "seconds": seconds,
        "train_cells_per_second": ft.epochs * len(train_ds) / seconds,
    }
    if len(val_ds):
        logits = model.get_outputs(val_ds, silent=True)
        summary["validation"] = modeling.macro_scores(np.asarray(val_ds["label_id"]), logits.argmax(1))
    info = _write_model_dir(params, run_dir, model, labels, summary)
    _log_model(params, run_dir)
    return info
