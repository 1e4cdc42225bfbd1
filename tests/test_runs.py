"""Run folders: safe names, atomic outputs, a manifest that concurrent writers don't corrupt, and the
Run object's stage attempts (status, timings, errors, status metrics) without running a notebook."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from helical_workflow import files, runs
from helical_workflow.params import load_params
from helical_workflow.runs import Run

from .conftest import ROOT, demo_params

README = ROOT / "README.md"


def test_airflow_run_ids_become_folder_names():
    assert runs.safe_run_id("manual__2026-11-25T20:28:00.794283+00:00") == "manual__2026-11-25T20_28_00.794283_00_00"
    assert runs.safe_run_id("scheduled__2026-01-01T00:00:00+00:00") != runs.safe_run_id(
        "scheduled__2026-01-02T00:00:00+00:00"
    )
    with pytest.raises(ValueError):
        runs.safe_run_id(":::")


def test_failed_stage_leaves_previous_output_and_no_partial_folder(tmp_path):
    with runs.stage_output(tmp_path, "tokenized") as d:
        (d / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with runs.stage_output(tmp_path, "tokenized") as d:
            (d / "a.txt").write_text("half")
            raise RuntimeError("killed")
    assert (tmp_path / "tokenized" / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["tokenized"]


def test_atomic_file_write_keeps_the_old_file_on_error(tmp_path):
    target = files.write_json(tmp_path / "m.json", {"a": 1})
    with pytest.raises(OSError):
        with files.atomic(target) as tmp:
            tmp.write_text("{half")
            raise OSError("disk full")
    assert target.read_text().strip().startswith("{") and '"a": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_missing_upstream_output_names_the_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="'load' stage has not completed"):
        runs.require_stage_output(tmp_path, "load")
    with pytest.raises(FileNotFoundError, match="'tokenize' stage has not completed"):
        runs.require_stage_output(tmp_path, "tokenized")


def _bump(run_dir: str, stage: str, n: int) -> None:
    for i in range(n):
        runs.update_manifest(
            Path(run_dir), lambda m, i=i: m.setdefault("stages", {}).setdefault(stage, {}).update(count=i + 1)
        )


def test_concurrent_manifest_updates_are_all_kept(tmp_path):
    procs = [mp.get_context("fork").Process(target=_bump, args=(str(tmp_path), f"s{i}", 30)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    stages = runs.read_manifest(tmp_path)["stages"]
    assert {k: v["count"] for k, v in stages.items()} == {f"s{i}": 30 for i in range(4)}


def _no_finalize(a: runs.Attempt) -> None:
    pass


def test_attempts_record_status_timings_errors_and_metrics(tmp_path, model_cache, workflow_env):
    params = load_params(demo_params(tmp_path, model_cache=model_cache, tokenize__shards=2))
    run = Run.create(params, "r1")
    assert run.dir == params.outputs_path / "demo" / "r1"
    # the run carries its own params (absolute paths): what notebooks and containers read
    copy = load_params(run.params_file)
    assert copy.data_path == params.data_path and copy.tokenize.shards == 2 and copy.profiles == params.profiles

    with run.attempt("load", finalize=_no_finalize) as a:
        assert run.record("load")["status"] == "running"
    assert a.status == "success" and run.record("load")["attempt"] == 1
    with pytest.raises(runs.StageNotReady, match=r"tokenize.shard-00001-of-00002: not run"):
        with run.attempt("fine_tune", finalize=_no_finalize):
            pass
    with run.attempt("tokenize", "0/2", finalize=_no_finalize):
        pass
    with pytest.raises(ZeroDivisionError):
        with run.attempt("tokenize", "1/2", finalize=_no_finalize):
            raise ZeroDivisionError("division by zero")
    rec = run.record("tokenize.shard-00001-of-00002")
    assert rec["status"] == "failed" and "ZeroDivisionError" in rec["error"] and rec["seconds"] >= 0
    status = (run.dir / "metrics" / "tokenize.shard-00001-of-00002_status.prom").read_text()
    assert 'helical_stage_success{experiment="demo",stage="tokenize"} 0.0' in status
    assert 'helical_stage_runs_total{experiment="demo",stage="tokenize",status="failed"} 1.0' in status
    with run.attempt("tokenize", "1/2", finalize=_no_finalize):
        pass
    assert run.record("tokenize.shard-00001-of-00002")["attempt"] == 2


def test_an_unreachable_pushgateway_is_a_warning_not_a_failure(tmp_path, model_cache, workflow_env, monkeypatch):
    monkeypatch.setenv("HELICAL_PUSHGATEWAY", "127.0.0.1:9")  # nothing listens on the discard port
    run = Run.create(demo_params(tmp_path, model_cache=model_cache), "r2")
    with run.attempt("load", finalize=_no_finalize):
        pass
    assert run.record("load")["status"] == "success"
    assert any("Pushgateway" in w for w in run.manifest["warnings"])
    assert (run.dir / "metrics" / "load_status.prom").exists()


@pytest.mark.slow
def test_mlflow_calls_made_while_the_server_is_down_are_kept_then_sent(tmp_path, model_cache, workflow_env):
    """The server is down: the first call fails within seconds (not the client's ~4 minutes of retries), it and
    every later call of the process are kept in the run folder, one warning says so. Once a server answers on that
    address, `helical-workflow mlflow-sync` sends them in order: the MLflow run gets its params, metrics and status."""
    import time

    from mlflow import MlflowClient

    from .conftest import cli, free_port, mlflow_server_at

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    pp = demo_params(tmp_path, model_cache=model_cache, tracking__mlflow_tracking_uri=url)
    run = Run.create(pp, "server-down")
    t0 = time.time()
    run.mlflow.log_metrics({"fine_tune.loss": 2.0}, step=0)
    run.mlflow.log_metrics({"fine_tune.loss": 1.0}, step=1)
    run.mlflow.log_artifacts(run.dir / "params", "params")
    run.mlflow.terminate("FINISHED")
    waited = time.time() - t0
    assert waited < 60, f"{waited:.0f} s waiting on a server that is down"
    assert run.mlflow.pending() == 4
    (warning,) = run.manifest["warnings"]
    assert "unreachable" in warning and f"helical-workflow mlflow-sync {run.dir}" in warning

    with mlflow_server_at(tmp_path / "server", port):
        # the README's command, as written there
        assert "`.venv/kernel/bin/helical-workflow mlflow-sync outputs/EXPERIMENT/RUN_ID`" in README.read_text()
        r = cli("mlflow-sync", run.dir, env=workflow_env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "4 kept call(s) sent" in r.stdout
        mlrun_id = runs.read_manifest(run.dir)["mlflow"]["run_id"]
        client = MlflowClient(url)
        got = client.get_run(mlrun_id)
        assert got.info.status == "FINISHED" and got.data.params["experiment"] == "demo"
        assert [(m.step, m.value) for m in client.get_metric_history(mlrun_id, "fine_tune.loss")] == [
            (0, 2.0),
            (1, 1.0),
        ]
        assert [a.path for a in client.list_artifacts(mlrun_id, "params")]
        assert run.mlflow.pending() == 0 and not (run.dir / "mlflow_pending.jsonl").exists()
        again = cli("mlflow-sync", run.dir, env=workflow_env)
        assert again.returncode == 0 and "nothing kept" in again.stdout


def test_a_full_disk_fails_the_write_with_the_disk_and_the_fix_and_keeps_nothing(tmp_path):
    """A small tmpfs as the outputs disk: a stage output larger than it fails naming the disk and the fix;
    no temporary or half-written folder is left, and the previous output is untouched."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    assert r.returncode == 0, f"cannot mount a tmpfs ({r.stderr.strip()}): the suite runs as root, as .ci/run does"
    try:
        with runs.stage_output(mnt, "tokenized") as d:
            (d / "small.bin").write_bytes(b"x" * 1000)
        with pytest.raises(files.OutOfSpace) as e:
            with runs.stage_output(mnt, "tokenized") as d:
                with open(d / "big.bin", "wb") as f:
                    for _ in range(4):
                        f.write(b"x" * 2**20)
        msg = str(e.value)
        assert f"No space left on the disk holding {mnt}" in msg and "Fix:" in msg and "HELICAL_WORKFLOW_OUTPUTS" in msg
        assert sorted(p.name for p in mnt.iterdir()) == ["tokenized"]
        assert [p.name for p in (mnt / "tokenized").iterdir()] == ["small.bin"]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_run_is_created_once_then_only_read(tmp_path, model_cache, workflow_env):
    """The run pins its params (and each sweep trial's) when it is created; editing the experiment file afterwards
    changes nothing in the run: not its params folder, not run.json, not what a later stage or a trial loads."""
    import yaml

    sweep = {"method": "grid", "grid": {"fine_tune.learning_rate": [0.001, 0.003]}}
    pp = demo_params(tmp_path, model_cache=model_cache, fine_tune__epochs=4, sweep=sweep)
    run = Run.create(pp, "r1", overrides={"fine_tune.batch_size": 8})
    raw = yaml.safe_load(pp.read_text())
    raw["fine_tune"]["epochs"] = 9
    raw["sweep"]["grid"]["fine_tune.learning_rate"] = [0.5, 0.7]
    pp.write_text(yaml.safe_dump(raw))

    again = Run.create(pp, run_dir=run.dir)  # the first task's retry: the run as created
    later = Run.load(run.dir)  # what every later task, container and link reads
    for r in (again, later):
        assert (r.params.fine_tune.epochs, r.params.fine_tune.batch_size) == (4, 8)
        assert r.params.overrides == {"fine_tune.batch_size": 8}
    assert runs.read_manifest(run.dir)["params"]["fine_tune"]["epochs"] == 4
    assert yaml.safe_load(run.params_file.read_text())["fine_tune"]["epochs"] == 4
    trials = [Run.load(run.dir, trial=k) for k in range(2)]
    assert [t.params.fine_tune.learning_rate for t in trials] == [0.001, 0.003]
    assert [t.dir.name for t in trials] == ["0", "1"] and all(t.params.fine_tune.epochs == 4 for t in trials)
    assert trials[1].params.overrides == {"fine_tune.batch_size": 8, "fine_tune.learning_rate": 0.003}
    with pytest.raises(FileNotFoundError, match="is not a created run"):
        Run.load(tmp_path / "nowhere")


def test_report_says_when_a_run_is_incomplete_and_lists_stages_in_table_order(tmp_path, capsys):
    """`helical-workflow report`: a failed or unfinished run says so first; stages (and a sweep's trials) come
    in the table's order, sorted, in aligned columns."""
    from helical_workflow.cli import print_reports

    trial = "fine_tune.trial-0000{}-of-00002"
    recorded = {
        trial.format(1): {"status": "failed", "seconds": 3.0},
        "load": {"status": "success", "seconds": 1.5},
        trial.format(0): {"status": "success", "seconds": 30.0},
        "tokenize": {"status": "success", "seconds": 2.0},
    }
    files.write_json(tmp_path / "run.json", {"stages": recorded})
    print_reports(tmp_path)
    out = capsys.readouterr().out.splitlines()
    assert out[2] == f"Status: INCOMPLETE (failed: {trial.format(1)}; not run: evaluate, compare)"
    rows = out[3:7]
    assert [r.split()[0] for r in rows] == ["load", "tokenize", trial.format(0), trial.format(1)]
    assert len({r.index(r.split()[1]) for r in rows}) == 1  # the status column lines up

    done = {**recorded, "evaluate": {"status": "success"}, "compare": {"status": "success"}}
    files.write_json(tmp_path / "run.json", {"stages": done})
    print_reports(tmp_path)
    assert f"Status: complete (failed, the others went on: {trial.format(1)})" in capsys.readouterr().out


def test_the_compare_headline_reads_as_sentences():
    """05_compare's headline: the registry's decision is its own sentence (capitalised, closed), after the
    verdict on the baselines; the majority-class row has both metrics."""
    from helical_workflow import compare

    summary = {
        "winner": None,
        "metric": "validation_macro_f1",
        "winner_score": 0.35,
        "margin_over_runner_up": None,
        "succeeded": 1,
        "trials": 1,
        "test": {"accuracy": 0.6, "macro_f1": 0.35},
        "baseline_logreg": {"accuracy": 0.7, "macro_f1": 0.5},
        "beats_logreg": False,
        "baseline_frozen": {},
        "majority_class_accuracy": 0.3,
        "baseline_majority": {"accuracy": 0.3, "macro_f1": 0.05},
        "registry": {"reason": "no champion yet: v1 becomes champion (0.350)"},
    }
    s = compare.winner_sentence(summary)
    assert s.endswith("(macro-F1 0.350 vs 0.500). Registry: No champion yet: v1 becomes champion (0.350).")
    table = compare.baselines_table(summary)
    assert table.loc["majority class"].tolist() == [0.3, 0.05]
    # with evaluate's intervals, the verdict and the table carry them
    summary["test"]["macro_f1_ci"], summary["baseline_logreg"]["macro_f1_ci"] = [0.28, 0.42], [0.41, 0.6]
    assert "(macro-F1 0.350, 95 % CI 0.280–0.420 vs 0.500, 95 % CI 0.410–0.600)" in compare.winner_sentence(summary)
    assert (
        compare.baselines_table(summary).loc["logistic regression (expression)", "macro_f1 95% CI"] == "0.410 – 0.600"
    )
