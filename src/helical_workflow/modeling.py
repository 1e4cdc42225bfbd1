"""The model layer shared by train, evaluate and annotate: tokens in, logits and embeddings out.

* :class:`TokenStore`: zero-copy access to the ``input_ids`` of memory-mapped Arrow shards;
* :func:`make_batches` (shuffled, length-grouped, deterministic per epoch) and :func:`collate`
  (dynamic padding);
* :func:`classifier`: helical's ``GeneformerFineTuningModel._forward`` as an ``nn.Module``
  (for DDP and autocast), :func:`set_mode`, :func:`autocast_ctx`;
* :func:`predict`, :func:`load_trained` (the fine-tuned model of a run folder) and :func:`load_model_dir`
  (of any folder laid out like a run's ``model/``, e.g. a registered model);
* :func:`device_for` and :func:`batch_size`: what a stage's resource profile asks for.

torch and helical are imported inside the functions that need them (helical takes seconds to import).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import model as model_mod
from . import runs, stages

if TYPE_CHECKING:
    import torch

    from .params import Params

WEIGHTS = "fine_tuned.pt"  # in the fine_tune stage's output folder, with LABELS
LABELS = "labels.json"


# ------------------------------------------------------------------ resources -----


def batch_size(params: "Params", stage: str) -> int:
    section = params.fine_tune if stage == "fine_tune" else params.evaluate
    return section.batch_size or params.profile_for(stage).batch_size


def cpu_threads(cpus: float) -> int:
    """torch's CPU threads for a profile's ``cpus``, at most ``$OMP_NUM_THREADS`` when that is set (what a batch
    scheduler or a container grants; the test suite gives each of its parallel workers one)."""
    n = max(1, int(cpus))
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    return min(n, int(env)) if env.isdigit() and int(env) > 0 else n


def deterministic(params: "Params") -> None:
    """``deterministic: true``: torch's deterministic algorithms (an error where an operation has none), cuDNN's
    autotuner off, and the cuBLAS workspace setting they need on GPU."""
    if not params.deterministic:
        return
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


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
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }


# ------------------------------------------------------------------ data ----------


class TokenStore:
    """Zero-copy access to the ``input_ids`` of memory-mapped Arrow shards."""

    def __init__(self, ds):
        table = ds.data.table if hasattr(ds.data, "table") else ds.data
        if getattr(ds, "_indices", None) is not None:
            raise ValueError("TokenStore needs the dataset without an indices mapping (no .select())")
        col = table.column("input_ids")
        self._flats, starts, ends, chunk = [], [], [], []
        for k, c in enumerate(col.chunks):
            offsets = np.asarray(c.offsets)
            self._flats.append(np.asarray(c.values))
            starts.append(offsets[:-1])
            ends.append(offsets[1:])
            chunk.append(np.full(len(c), k, dtype=np.int32))
        self.starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)
        self.chunk = np.concatenate(chunk) if chunk else np.zeros(0, np.int32)
        self.lengths = (self.ends - self.starts).astype(np.int64)
        names = table.column_names
        self.labels = np.asarray(table.column("label_id").to_numpy()) if "label_id" in names else None
        self.split = np.asarray(table.column("split").to_pylist()) if "split" in names else None
        self.cell_id = table.column("cell_id").to_pylist() if "cell_id" in names else None

    def __len__(self) -> int:
        return len(self.starts)

    def get(self, i: int) -> np.ndarray:
        return self._flats[self.chunk[i]][self.starts[i] : self.ends[i]]

    def indices(self, split: str) -> np.ndarray:
        """The cells of one split that have at least one token."""
        return np.nonzero((self.split == split) & (self.lengths > 0))[0]


def make_batches(
    lengths: np.ndarray,
    idx: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    group_by_length: bool = True,
    mega: int = 50,
) -> list[np.ndarray]:
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


def classifier(model) -> "torch.nn.Module":
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


def predict(
    model, store: TokenStore, idx: np.ndarray, *, batch_size: int, device: str, precision: str, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and cell embeddings (the pooled input of the head: helical's 'cell' embedding), in ``idx`` order."""
    import torch

    net = classifier(model).to(device)
    captured: list[torch.Tensor] = []
    hook = model.fine_tuning_head.register_forward_hook(lambda m, inp, out: captured.append(inp[0].detach().float()))
    set_mode(model, training=False)
    order = np.argsort(-store.lengths[idx], kind="stable")  # length-sorted: little padding
    logits, embs = [], []
    try:
        with torch.no_grad(), autocast_ctx(device, precision):
            for i in range(0, len(order), batch_size):
                b = collate(store, np.asarray(idx)[order[i : i + batch_size]], pad_id)
                out = net(b["input_ids"].to(device), b["attention_mask"].to(device), b["length"].to(device))
                logits.append(out.float().cpu().numpy())
                embs.append(captured.pop().cpu().numpy())
    finally:
        hook.remove()
    if not logits:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    inv = np.argsort(order)  # back to the order of idx
    return np.concatenate(logits)[inv], np.concatenate(embs)[inv]


def load_trained(params: "Params", run_dir: Path, *, batch_size: int, device: str):
    """The fine-tuned model of a run (the fine_tune stage's output folder), and its label mapping."""
    d = runs.require_stage_output(run_dir, stages.get("fine_tune").output, "fine_tune")
    return load_model_dir(params, d, batch_size=batch_size, device=device)


def load_model_dir(params: "Params", model_dir: Path, *, batch_size: int, device: str):
    """The fine-tuned model in a folder laid out like a run's ``model/`` (``WEIGHTS``, ``LABELS``), and its
    label mapping: helical's model rebuilt from the base model files that ``params`` point at, then the weights."""
    import torch

    d = Path(model_dir)
    labels = json.loads((d / LABELS).read_text())
    model = model_mod.load_fine_tuning_model(params, n_classes=len(labels), batch_size=batch_size, device=device)
    model.load_state_dict(torch.load(d / WEIGHTS, map_location=device, weights_only=True))
    # no model.eval(): helical's fine-tuning model overrides nn.Module.train; predict / get_outputs set eval mode
    return model, labels
