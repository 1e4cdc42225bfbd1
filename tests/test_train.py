"""Our fine-tuning loop: batching, parity with helical's first step, resume, bf16, DDP on CPU."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helical_workflow import data, modeling, train
from helical_workflow import tokenize as tok
from helical_workflow.params import load_params

from .conftest import demo_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A run folder with the load and tokenize stages done (demo data, local tiny model)."""
    root = tmp_path_factory.mktemp("prepared")
    cache = root / "models"
    pp = demo_params(root, model_cache=cache)
    params = load_params(pp)
    run_dir = root / "run"
    data.load_stage(params, run_dir)
    tok.tokenize_stage(params, run_dir)
    return root, cache, run_dir


def fresh(prepared, tmp_path, **overrides):
    root, cache, run_dir = prepared
    rd = tmp_path / "run"
    shutil.copytree(run_dir, rd, ignore=shutil.ignore_patterns("checkpoints", "model"))
    pp = demo_params(tmp_path, model_cache=cache, **overrides)
    return pp, load_params(pp), rd


def test_batches_are_shuffled_per_epoch_grouped_by_length_and_complete():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 1000, 1000)
    idx = np.arange(1000)
    e0 = modeling.make_batches(lengths, idx, 16, seed=1, epoch=0)
    assert sorted(np.concatenate(e0).tolist()) == idx.tolist()
    assert [b.tolist() for b in e0] == [b.tolist() for b in modeling.make_batches(lengths, idx, 16, seed=1, epoch=0)]
    e1 = modeling.make_batches(lengths, idx, 16, seed=1, epoch=1)
    assert [b.tolist() for b in e0] != [b.tolist() for b in e1]

    def padding(batches):
        return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in batches)

    plain = modeling.make_batches(lengths, idx, 16, seed=1, epoch=0, group_by_length=False)
    assert padding(e0) < padding(plain) / 5
    ordered = modeling.make_batches(lengths, idx, 16, seed=1, epoch=0, shuffle=False)
    assert np.concatenate(ordered).tolist() == idx.tolist()


def test_first_step_loss_equals_helicals_in_fp32(prepared, tmp_path):
    import torch

    from helical_workflow import model as model_mod

    pp, params, rd = fresh(prepared, tmp_path)
    ds = tok.load_tokenized(rd)
    store = modeling.TokenStore(ds)
    labels = tok.read_labels(rd)
    train_idx = np.nonzero(store.split == "train")[0]
    bs = 10
    torch.manual_seed(0)
    ref = model_mod.load_fine_tuning_model(params, n_classes=len(labels), batch_size=bs, device="cpu")
    torch.manual_seed(0)
    ours = model_mod.load_fine_tuning_model(params, n_classes=len(labels), batch_size=bs, device="cpu")

    recorded = []

    class Recording(torch.nn.CrossEntropyLoss):
        def forward(self, logits, target):
            loss = super().forward(logits, target)
            recorded.append(float(loss))
            return loss

    torch.manual_seed(123)
    ref.train(
        train_dataset=ds.select(train_idx[:bs]),
        label="label_id",
        epochs=1,
        freeze_layers=0,
        optimizer_params={"lr": 1e-4},
        loss_function=Recording(),
        silent=True,
    )
    # ours, with helical's batch order (no shuffling) and helical's modes (encoder in eval mode)
    first = modeling.make_batches(store.lengths, train_idx, bs, seed=0, epoch=0, shuffle=False)[0]
    torch.manual_seed(123)
    modeling.set_mode(ours, training=True, encoder_dropout=False)
    b = modeling.collate(store, first, ours.pad_token_id)
    logits = modeling.classifier(ours)(b["input_ids"], b["attention_mask"], b["length"])
    loss = torch.nn.CrossEntropyLoss()(logits, b["labels"])
    assert abs(float(loss) - recorded[0]) < 1e-5


def _fine_tune_cmd(pp, rd):
    code = (
        "import sys; from helical_workflow.params import load_params; from helical_workflow import train; "
        "train.fine_tune_stage(load_params(sys.argv[1]), sys.argv[2])"
    )
    return [sys.executable, "-c", code, str(pp), str(rd)]


def test_killed_run_resumes_to_the_same_result(prepared, tmp_path, workflow_env):
    # with torch's deterministic algorithms on (`deterministic: true`): the same seed, the same result
    kw = dict(fine_tune__epochs=3, fine_tune__learning_rate=5e-4, deterministic=True)
    pp_a, _, rd_a = fresh(prepared, tmp_path / "a", **kw)
    pp_b, _, rd_b = fresh(prepared, tmp_path / "b", **kw)
    # uninterrupted
    subprocess.run(_fine_tune_cmd(pp_a, rd_a), check=True, capture_output=True, env=workflow_env)
    # killed (SIGKILL) once the first epoch's checkpoint exists, then run again
    proc = subprocess.Popen(
        _fine_tune_cmd(pp_b, rd_b), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=workflow_env
    )
    ckpt = rd_b / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (rd_b / "model").exists()  # nothing that looks finished
    done = subprocess.run(_fine_tune_cmd(pp_b, rd_b), capture_output=True, text=True, env=workflow_env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout
    ha = json.loads((rd_a / "model" / "history.json").read_text())["epochs"]
    hb = json.loads((rd_b / "model" / "history.json").read_text())["epochs"]
    assert [(h["epoch"], h["val_accuracy"], h["val_macro_f1"], round(h["train_loss"], 6)) for h in ha] == [
        (h["epoch"], h["val_accuracy"], h["val_macro_f1"], round(h["train_loss"], 6)) for h in hb
    ]
    import torch

    wa = torch.load(rd_a / "model" / "fine_tuned.pt", weights_only=True)
    wb = torch.load(rd_b / "model" / "fine_tuned.pt", weights_only=True)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_resume_from_a_step_checkpoint_mid_epoch_is_exact(prepared, tmp_path, monkeypatch):
    """A crash inside an epoch resumes from the last step checkpoint to the same losses and weights."""
    import torch

    from helical_workflow import model as model_mod

    def fit(rd, params, crash_at_batch=None):
        store = modeling.TokenStore(tok.load_tokenized(rd))
        labels = tok.read_labels(rd)
        torch.manual_seed(0)
        m = model_mod.load_fine_tuning_model(params, n_classes=len(labels), batch_size=10, device="cpu")
        calls = []

        def collate(*a, **k):
            calls.append(1)
            if len(calls) == crash_at_batch:
                raise RuntimeError("killed")
            return modeling.collate(*a, **k)

        if crash_at_batch:
            monkeypatch.setattr(train, "collate", collate)
        try:
            out = train.train_loop(
                train.TrainSetup(params, rd, "cpu", "fp32", 10),
                m,
                store,
                store.indices("train")[:60],
                store.indices("validation")[:20],
                len(labels),
            )
        finally:
            monkeypatch.undo()
        return out, m.state_dict()

    kw = dict(
        fine_tune__epochs=2,
        fine_tune__checkpoint_every_steps=2,
        fine_tune__log_every_steps=1,
        fine_tune__learning_rate=5e-4,
    )
    _, params_a, rd_a = fresh(prepared, tmp_path / "a", **kw)
    _, params_b, rd_b = fresh(prepared, tmp_path / "b", **kw)
    out_a, wa = fit(rd_a, params_a)
    # 6 batches an epoch, a checkpoint every 2 steps: the 11th batch is the 5th of epoch 2, after step 10's checkpoint
    with pytest.raises(RuntimeError, match="killed"):
        fit(rd_b, params_b, crash_at_batch=11)
    out_b, wb = fit(rd_b, params_b)

    def key(h):
        return h["epoch"], round(h["train_loss"], 6), round(h["val_loss"], 6), h["val_macro_f1"]

    assert [key(h) for h in out_a["history"]] == [key(h) for h in out_b["history"]]
    assert out_a["steps"] == out_b["steps"] and out_a["global_step"] == out_b["global_step"] == 12
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_bf16_on_cpu_runs_and_learns(prepared, tmp_path, workflow_env):
    import torch

    from helical_workflow import model as model_mod

    pp, params, rd = fresh(prepared, tmp_path)
    store = modeling.TokenStore(tok.load_tokenized(rd))
    labels = tok.read_labels(rd)
    idx = np.nonzero(store.split == "train")[0][:16]
    torch.manual_seed(0)
    m = model_mod.load_fine_tuning_model(params, n_classes=len(labels), batch_size=8, device="cpu")
    net = modeling.classifier(m)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    modeling.set_mode(m, True)
    b = modeling.collate(store, idx, m.pad_token_id)
    losses = []
    for _ in range(12):
        with modeling.autocast_ctx("cpu", "bf16"):
            logits = net(b["input_ids"], b["attention_mask"], b["length"])
            assert logits.dtype == torch.bfloat16
            loss = torch.nn.functional.cross_entropy(logits.float(), b["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.75 * np.mean(losses[:3])


def test_ddp_with_two_cpu_processes(prepared, tmp_path, workflow_env):
    pp, params, rd = fresh(prepared, tmp_path, fine_tune__processes=2, fine_tune__epochs=2)
    r = subprocess.run(_fine_tune_cmd(pp, rd), capture_output=True, text=True, env=workflow_env)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((rd / "model" / "model_info.json").read_text())
    hist = json.loads((rd / "model" / "history.json").read_text())["epochs"]
    assert info["epochs_run"] == 2 and len(hist) == 2
    assert hist[1]["train_loss"] < hist[0]["train_loss"]
    # each of the 2 ranks took half of the batches: 16 optimizer steps per epoch instead of 31
    assert info["optimizer_steps"] == 2 * (31 // 2)


def test_gpu_profile_without_gpu_fails_before_compute(tmp_path, model_cache):
    import torch

    params = load_params(demo_params(tmp_path, model_cache=model_cache, stage_profiles={"fine_tune": "gpu"}))
    assert not torch.cuda.is_available()
    with pytest.raises(RuntimeError, match="asks for a GPU .* none is visible. Fix: run on a GPU host or choose a CPU"):
        modeling.device_for(params, "fine_tune")


def test_ddp_trains_each_sweep_trial_with_its_own_settings(prepared, tmp_path, workflow_env):
    """A 2-trial sweep with 2 data-parallel processes (gloo, CPU): each trial's workers train with that trial's
    learning rate and freeze, as its checkpoint records, not trial 0's (nor the experiment file's)."""
    import torch

    from helical_workflow.runs import Run

    sweep = {"method": "grid", "grid": {"fine_tune.learning_rate": [0.001, 0.004], "fine_tune.freeze_layers": [1]}}
    pp, _, rd = fresh(
        prepared,
        tmp_path,
        fine_tune__processes=2,
        fine_tune__epochs=1,
        fine_tune__checkpoint_every_steps=2,
        sweep=sweep,
    )
    run = Run.create(pp, run_dir=rd)
    code = (
        "import sys; from helical_workflow.runs import Run; from helical_workflow import train; "
        "t = Run.load(sys.argv[1], trial=int(sys.argv[2])); train.fine_tune_stage(t.params, t.dir)"
    )
    for k in range(2):
        r = subprocess.run(
            [sys.executable, "-c", code, str(run.dir), str(k)], capture_output=True, text=True, env=workflow_env
        )
        assert r.returncode == 0, r.stderr[-3000:]
    for k, lr in enumerate((0.001, 0.004)):
        ck = torch.load(rd / "trials" / str(k) / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
        assert ck["fine_tune"]["learning_rate"] == lr and ck["fine_tune"]["freeze_layers"] == 1, k
        assert ck["optimizer"]["param_groups"][0]["initial_lr"] == lr, k
