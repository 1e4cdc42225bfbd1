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
one place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import model as model_mod
from . import runs, tracking
from . import tokenize as tok

if TYPE_CHECKING:
    import torch

    from .params import Params

log = logging.getLogger(__name__)

OUTPUT = "model"
WEIGHTS = "fine_tuned.pt"
CHECKPOINTS = "checkpoints"


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


# ------------------------------------------------------------------ data ----------

class TokenStore:
    """Zero-copy access to the ``input_ids`` of memory-mapped Arrow shards."""

    def __init__(self, ds):
        table = ds.data.table if hasattr(ds.data, "table") else ds.data
        if getattr(ds, "_indices", None) is not None:
            raise ValueError("TokenStore needs the dataset without an indices mapping (no .select())")
        col = table.column("input_ids")
        self._flats, starts, ends, self._chunk = [], [], [], []
        for k, chunk in enumerate(col.chunks):
            offsets = np.asarray(chunk.offsets)
            flat = np.asarray(chunk.values)
            self._flats.append(flat)
            starts.append(offsets[:-1])
            ends.append(offsets[1:])
            self._chunk.append(np.full(len(chunk), k, dtype=np.int32))
        self.starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)
        self.chunk = np.concatenate(self._chunk) if self._chunk else np.zeros(0, np.int32)
        self.lengths = (self.ends - self.starts).astype(np.int64)
        self.labels = np.asarray(table.column("label_id").to_numpy()) if "label_id" in table.column_names else None
        self.split = np.asarray(table.column("split").to_pylist()) if "split" in table.column_names else None
        self.cell_id = table.column("cell_id").to_pylist() if "cell_id" in table.column_names else None

    def __len__(self) -> int:
        return len(self.starts)

    def get(self, i: int) -> np.ndarray:
        return self._flats[self.chunk[i]][self.starts[i] : self.ends[i]]


def make_batches(lengths: np.ndarray, idx: np.ndarray, batch_size: int, *, seed: int, epoch: int,
                 shuffle: bool = True, group_by_length: bool = True, mega: int = 50) -> list[np.ndarray]:
    """Batches of example indices for one epoch, deterministic for (seed, epoch).

    Shuffled every epoch; with ``group_by_length`` the examples of each shuffled
    mega-batch (``mega`` batches) are sorted by length so that a batch pads little, and
    the batch order is shuffled again. Without shuffling: dataset order (helical's order).
    """
    idx = np.asarray(idx)
    if not shuffle:
        return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    rng = np.random.default_rng([seed, epoch])
    perm = idx[rng.permutation(len(idx))]
    if not group_by_length:
        return [perm[i : i + batch_size] for i in range(0, len(perm), batch_size)]
    batches = []
    step = batch_size * mega
    for m in range(0, len(perm), step):
        chunk = perm[m : m + step]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def collate(store: TokenStore, batch: np.ndarray, pad_id: int, pin: bool = False) -> dict[str, "torch.Tensor"]:
    """Dynamic padding to the longest cell of the batch."""
    import torch

    lens = store.lengths[batch]
    width = int(lens.max()) if len(lens) else 0
    ids = np.full((len(batch), width), pad_id, dtype=np.int64)
    for r, i in enumerate(batch):
        ids[r, : lens[r]] = store.get(int(i))
    out = {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy((np.arange(width)[None, :] < lens[:, None]).astype(np.int64)),
        "length": torch.from_numpy(lens.copy()),
    }
    if store.labels is not None:
        out["labels"] = torch.from_numpy(store.labels[batch].astype(np.int64))
    if pin:
        out = {k: v.pin_memory() for k, v in out.items()}
    return out


# ------------------------------------------------------------------ model ---------

def _classifier_module(model):
    """An nn.Module computing helical's ``_forward`` (for DDP and autocast), without the masked-LM head.

    helical runs the whole BertForMaskedLM (vocabulary logits for every token, all hidden states)
    and keeps only the last hidden state; the encoder alone gives that same tensor at a fraction
    of the cost. Pooling (cls / mean over non-padding) and the head are helical's own.
    """
    import torch
    from helical.models.geneformer.geneformer_utils import mean_nonpadding_embs

    class Classifier(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, length):
            m = self.inner
            emb = m.model.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            if m.emb_mode == "cls" and m.cls_present:
                emb = emb[:, 0, :]
            else:
                length = length.clone()
                if m.cls_present:
                    emb = emb[:, 1:, :]
                    length = length - (2 if m.eos_present else 1)
                emb = mean_nonpadding_embs(emb, length)
            return m.fine_tuning_head(emb)

    return Classifier(model)


def set_mode(model, training: bool, encoder_dropout: bool = True) -> None:
    """Train/eval mode of helical's model. Never call ``.train()`` on it or on a wrapper around it:
    helical's GeneformerFineTuningModel overrides nn.Module.train with its own training API.

    ``encoder_dropout=False`` keeps the encoder in eval mode while training, as helical's own
    ``train`` does (it never switches the encoder out of eval mode; the head's dropout is active).
    """
    model.model.train(training and encoder_dropout)
    model.fine_tuning_head.train(training)


def autocast_ctx(device: str, precision: str):
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def predict(model, store: TokenStore, idx: np.ndarray, *, batch_size: int, device: str, precision: str,
            pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits and cell embeddings (the pooled input of the head: helical's 'cell' embedding)."""
    import torch

    net = _classifier_module(model).to(device)
    captured: list[torch.Tensor] = []
    hook = model.fine_tuning_head.register_forward_hook(lambda m, inp, out: captured.append(inp[0].detach().float()))
    set_mode(model, training=False)
    order = np.asarray(idx)[np.argsort(-store.lengths[idx], kind="stable")]  # length-sorted: little padding
    logits, embs = [], []
    try:
        with torch.no_grad(), autocast_ctx(device, precision):
            for i in range(0, len(order), batch_size):
                b = collate(store, order[i : i + batch_size], pad_id)
                out = net(b["input_ids"].to(device), b["attention_mask"].to(device), b["length"].to(device))
                logits.append(out.float().cpu().numpy())
                embs.append(captured.pop().cpu().numpy())
    finally:
        hook.remove()
    inv = np.empty(len(order), dtype=np.int64)
    pos = {int(v): k for k, v in enumerate(order)}
    inv[:] = [pos[int(v)] for v in idx]
    if not logits:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate(logits)[inv], np.concatenate(embs)[inv]


# ------------------------------------------------------------------ the loop ------

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


def _fingerprint(params: "Params", run_dir: Path) -> str:
    import hashlib

    m = runs.read_manifest(run_dir)
    blob = json.dumps({"fine_tune": params.fine_tune.model_dump(mode="json"), "model": params.model.model_dump(mode="json"),
                       "input": m.get("input", {}), "seed": params.data.split.seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save_atomic(obj: Any, path: Path) -> None:
    import torch

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _progress(total: int, desc: str, disable: bool):
    from tqdm.auto import tqdm

    # Airflow logs and papermill capture stdout: few, complete lines; a notebook front end updates in place
    return tqdm(total=total, desc=desc, disable=disable, mininterval=5.0, file=sys.stdout, dynamic_ncols=False,
                ascii=True, leave=True)


def train_loop(setup: TrainSetup, model, store: TokenStore, train_idx: np.ndarray, val_idx: np.ndarray,
               n_classes: int) -> dict[str, Any]:
    """Fine-tune ``model`` (helical's GeneformerFineTuningModel) in place; returns the history."""
    import torch
    from transformers import get_scheduler

    p, ft = setup.params, setup.params.fine_tune
    dev, prec = setup.device, setup.precision
    pad_id = model.pad_token_id
    ckpt_dir = setup.run_dir / CHECKPOINTS
    last, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    fingerprint = _fingerprint(p, setup.run_dir)

    for layer in model.model.bert.encoder.layer[: ft.freeze_layers]:  # as helical: freeze the first layers
        for prm in layer.parameters():
            prm.requires_grad = False
    # the masked-LM head is not used by classification (its decoder weight is the tied word embedding: keep that)
    tied = model.model.bert.embeddings.word_embeddings.weight
    for prm in model.model.cls.parameters():
        if prm is not tied:
            prm.requires_grad = False
    net = _classifier_module(model).to(dev)
    if setup.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[torch.device(dev).index] if dev.startswith("cuda") else None)
    trainable = [q for q in net.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=ft.learning_rate, weight_decay=ft.weight_decay)
    n_batches = math.ceil(len(train_idx) / setup.batch_size) // setup.world  # what make_batches gives a rank
    steps_per_epoch = math.ceil(n_batches / ft.gradient_accumulation)
    total_steps = max(1, steps_per_epoch * ft.epochs)
    scheduler = get_scheduler(ft.scheduler, optimizer=optimizer, num_warmup_steps=int(ft.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    scaler = torch.amp.GradScaler("cuda", enabled=(prec == "fp16" and dev.startswith("cuda")))
    weights = None
    if ft.class_weights:
        counts = np.bincount(store.labels[train_idx], minlength=n_classes).astype(np.float64)
        weights = torch.tensor(len(train_idx) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32, device=dev)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights)

    state = {"epoch": 0, "batch": 0, "global_step": 0, "history": [], "steps": [], "steps_logged": 0, "best_f1": -1.0,
             "best_epoch": None, "bad_epochs": 0, "stopped_early": False}
    if last.exists():
        ck = torch.load(last, map_location=dev, weights_only=False)
        if ck.get("fingerprint") != fingerprint:
            raise RuntimeError(f"{last} was written with other parameters or data. Fix: remove {ckpt_dir} "
                               "(or use a new run id) to train from scratch.")
        (net.module if setup.world > 1 else net).load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["torch_rng"])
        state = ck["state"]
        if setup.main:
            print(f"resuming from {last}: epoch {state['epoch'] + 1}, batch {state['batch']}, step {state['global_step']}")

    def checkpoint() -> None:
        if setup.main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            _save_atomic({"model": (net.module if setup.world > 1 else net).state_dict(),
                          "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state(), "state": state,
                          "fingerprint": fingerprint}, last)

    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t_start, cells_seen = time.perf_counter(), 0
    while state["epoch"] < ft.epochs and not state["stopped_early"]:
        epoch = state["epoch"]
        batches = make_batches(store.lengths, train_idx, setup.batch_size, seed=p.model.seed, epoch=epoch,
                               shuffle=ft.shuffle, group_by_length=ft.group_by_length)
        batches = batches[: len(batches) - len(batches) % setup.world][setup.rank :: setup.world]
        set_mode(model, training=True, encoder_dropout=ft.encoder_dropout)
        bar = _progress(len(batches), f"epoch {epoch + 1}/{ft.epochs}", disable=not setup.main)
        bar.update(state["batch"])
        t_epoch, epoch_loss, epoch_batches = time.perf_counter(), 0.0, 0
        for b_i in range(state["batch"], len(batches)):
            b = collate(store, batches[b_i], pad_id, pin=dev.startswith("cuda"))
            b = {k: v.to(dev, non_blocking=True) for k, v in b.items()}
            last_micro = (b_i + 1) % ft.gradient_accumulation == 0 or b_i + 1 == len(batches)
            sync = contextlib.nullcontext() if (setup.world == 1 or last_micro) else net.no_sync()
            with sync:
                with autocast_ctx(dev, prec):
                    logits = net(b["input_ids"], b["attention_mask"], b["length"])
                    loss = loss_fn(logits.float(), b["labels"])
                scaler.scale(loss / ft.gradient_accumulation).backward()
            if last_micro:
                if ft.max_grad_norm:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(trainable, ft.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                state["global_step"] += 1
            loss_v = float(loss.detach())
            epoch_loss += loss_v
            epoch_batches += 1
            cells_seen += len(batches[b_i]) * setup.world
            state["batch"] = b_i + 1
            if setup.main and state["global_step"] % ft.log_every_steps == 0 and last_micro:
                state["steps"].append({"step": state["global_step"], "loss": loss_v, "lr": scheduler.get_last_lr()[0]})
            bar.set_postfix(loss=f"{epoch_loss / epoch_batches:.4f}", refresh=False)
            bar.update(1)
            if ft.checkpoint_every_steps and last_micro and state["global_step"] % ft.checkpoint_every_steps == 0:
                checkpoint()
        bar.close()
        seconds = time.perf_counter() - t_epoch
        record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": epoch_loss / max(epoch_batches, 1),
                                  "lr": scheduler.get_last_lr()[0], "seconds": seconds,
                                  "cells_per_second": epoch_batches * setup.batch_size * setup.world / max(seconds, 1e-9)}
        if len(val_idx):
            logits, _ = predict(model, store, val_idx, batch_size=setup.batch_size * 2, device=dev, precision=prec,
                                pad_id=pad_id)
            y = store.labels[val_idx]
            import torch.nn.functional as F

            record["val_loss"] = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y.astype(np.int64))))
            record.update({f"val_{k}": v for k, v in macro_scores(y, logits.argmax(1)).items()})
            if record["val_macro_f1"] > state["best_f1"] + 1e-9:
                state.update(best_f1=record["val_macro_f1"], best_epoch=epoch + 1, bad_epochs=0)
                if setup.main:
                    ckpt_dir.mkdir(parents=True, exist_ok=True)
                    _save_atomic(model.state_dict(), best_path)
            else:
                state["bad_epochs"] += 1
                if ft.early_stopping_patience and state["bad_epochs"] >= ft.early_stopping_patience:
                    state["stopped_early"] = True
        if dev.startswith("cuda"):
            record["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated())
        state["history"].append(record)
        state["epoch"], state["batch"] = epoch + 1, 0
        if setup.main:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()), flush=True)
            _log_epoch(p, setup.run_dir, record, state)
        checkpoint()
    if best_path.exists() and state["best_epoch"] is not None:
        model.load_state_dict(torch.load(best_path, map_location=dev, weights_only=True))
    return {"history": state["history"], "steps": state["steps"], "best_epoch": state["best_epoch"],
            "stopped_early": state["stopped_early"], "global_step": state["global_step"],
            "seconds_this_attempt": time.perf_counter() - t_start, "cells_this_attempt": cells_seen}


def _log_epoch(params: "Params", run_dir: Path, record: dict[str, Any], state: dict[str, Any]) -> None:
    """The epoch's record, and the step losses not yet logged (each step goes to MLflow once)."""
    try:
        tracking.log_metrics(params, run_dir, {f"fine_tune.{k}": v for k, v in record.items() if k != "epoch"},
                             step=record["epoch"])
        new = state["steps"][state.get("steps_logged", 0):]
        if new:
            tracking.log_metrics_series(params, run_dir, "fine_tune.step_loss", [(s["step"], s["loss"]) for s in new])
        state["steps_logged"] = len(state["steps"])
    except Exception as e:  # tracking must not stop training
        log.warning("MLflow logging failed: %s", e)


# ------------------------------------------------------------------ the stage -----

def _prepare(params: "Params", run_dir: Path):
    ds = tok.load_tokenized(run_dir, expected=params.tokenize.shards)
    labels = tok.read_labels(run_dir)
    store = TokenStore(ds)
    keep = store.lengths > 0
    train_idx = np.nonzero((store.split == "train") & keep)[0]
    val_idx = np.nonzero((store.split == "validation") & keep)[0]
    if len(train_idx) == 0:
        raise ValueError("the training split is empty. Fix: check data.split fractions and min_cells_per_class.")
    return store, labels, train_idx, val_idx


def _ddp_worker(rank: int, world: int, params_path: str, run_dir: str, port: int) -> None:
    import torch
    import torch.distributed as dist

    from .params import load_params

    params = load_params(params_path)
    profile = params.profile_for("fine_tune")
    cuda = profile.device == "cuda"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        dev = f"cuda:{rank}" if cuda else "cpu"
        if cuda:
            torch.cuda.set_device(rank)
        torch.set_num_threads(max(1, int(profile.cpus) // world))
        _train_here(params, Path(run_dir), device=dev, rank=rank, world=world)  # rank 0 writes model/
    finally:
        dist.destroy_process_group()


def _train_here(params: "Params", run_dir: Path, *, device: str, rank: int = 0, world: int = 1) -> dict[str, Any]:
    import torch

    store, labels, train_idx, val_idx = _prepare(params, run_dir)
    bs = batch_size(params, "fine_tune")
    torch.manual_seed(params.model.seed)
    model = model_mod.load_fine_tuning_model(params, n_classes=len(labels), batch_size=bs, device=device)
    setup = TrainSetup(params, run_dir, device, params.profile_for("fine_tune").precision, bs, rank, world)
    out = train_loop(setup, model, store, train_idx, val_idx, len(labels))
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
    device = device_for(params, "fine_tune")
    world = ft.processes or max(1, profile.gpus)
    if profile.device == "cuda" and world > profile.gpus:
        raise RuntimeError(f"fine_tune.processes={world} but the profile has {profile.gpus} GPU(s). Fix: lower it.")
    t0 = time.perf_counter()
    if world == 1:
        import torch

        torch.set_num_threads(max(1, int(profile.cpus)))
        _train_here(params, run_dir, device=device)
    else:
        import torch.multiprocessing as tmp_mp

        method = "spawn" if profile.device == "cuda" else "fork"
        tmp_mp.start_processes(_ddp_worker, args=(world, params.source_path, str(run_dir), _free_port()),
                               nprocs=world, join=True, start_method=method)
    seconds = time.perf_counter() - t0
    info = json.loads((run_dir / OUTPUT / "model_info.json").read_text())
    tracking.log_artifacts(params, run_dir, run_dir / OUTPUT, "model")
    return {**info, "seconds": seconds, "processes": world}


def _save_model(params: "Params", run_dir: Path, model, labels: dict[str, int], out: dict[str, Any]) -> None:
    import torch

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
        "batch_size": batch_size(params, "fine_tune"),
        "train_cells_per_second": float(np.mean([h["cells_per_second"] for h in hist])) if hist else None,
        "validation": {k.removeprefix("val_"): v for k, v in best.items() if k in ("val_accuracy", "val_macro_f1")},
    }
    if "peak_gpu_memory_bytes" in last:
        summary["peak_gpu_memory_bytes"] = max(h.get("peak_gpu_memory_bytes", 0) for h in hist)
    _write_model_dir(params, run_dir, model, labels, summary, history={"epochs": hist, "steps": out["steps"]})


def _write_model_dir(params: "Params", run_dir: Path, model, labels: dict[str, int], summary: dict[str, Any],
                     history: dict[str, Any] | None = None) -> dict[str, Any]:
    """``model/``: weights, label mapping, model_info.json (and the training history), written atomically."""
    import torch

    info = {"model_name": params.model.name, "n_classes": len(labels), "source": params.model.source,
            "base_model_dir": str(model_mod.model_paths(params)["model_files_dir"]), **summary}
    with runs.stage_output(run_dir, OUTPUT) as d:
        torch.save(model.state_dict(), d / WEIGHTS)
        (d / "labels.json").write_text(json.dumps(labels, indent=2))
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
    device = device_for(params, "fine_tune")
    bs = batch_size(params, "fine_tune")
    torch.manual_seed(params.model.seed)
    model = model_mod.load_fine_tuning_model(params, n_classes=len(labels), batch_size=bs, device=device)
    ft = params.fine_tune
    t0 = time.perf_counter()
    model.train(train_dataset=train_ds, label="label_id", epochs=ft.epochs, optimizer_params={"lr": ft.learning_rate},
                freeze_layers=ft.freeze_layers, validation_dataset=val_ds if len(val_ds) else None)
    seconds = time.perf_counter() - t0
    summary: dict[str, Any] = {
        "implementation": "helical", "device": device, "precision": "fp32", "epochs_run": ft.epochs,
        "batch_size": bs, "train_cells": len(train_ds), "validation_cells": len(val_ds), "seconds": seconds,
        "train_cells_per_second": ft.epochs * len(train_ds) / seconds,
    }
    if len(val_ds):
        logits = model.get_outputs(val_ds, silent=True)
        summary["validation"] = macro_scores(np.asarray(val_ds["label_id"]), logits.argmax(1))
    info = _write_model_dir(params, run_dir, model, labels, summary)
    tracking.log_artifacts(params, run_dir, run_dir / OUTPUT, "model")
    return info


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
