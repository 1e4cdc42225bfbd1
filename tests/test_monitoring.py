"""Monitoring with real binaries: Prometheus, Pushgateway and node-exporter (Debian packages) on loopback,
a demo DAG run through Airflow pushing stage metrics, and Airflow's StatsD packets captured off the wire."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from .conftest import AIRFLOW_BIN, ROOT, airflow_home, demo_params, free_port, run

DASHBOARD = ROOT / "compose" / "grafana" / "dashboards" / "helical-workflow.json"
MAPPING = ROOT / "compose" / "statsd" / "mapping.yml"


def statsd_map(name: str, mapping: dict) -> tuple[str, dict[str, str]] | None:
    """statsd_exporter's glob mapping: '*' is one dot-free run of characters; $N the N-th match."""
    for rule in mapping["mappings"]:
        rx = "^" + re.escape(rule["match"]).replace(r"\*", r"([^.]+)") + "$"
        m = re.match(rx, name)
        if m:
            labels = {
                k: re.sub(r"\$(\d+)", lambda g, m=m: m.group(int(g.group(1))), v)
                for k, v in (rule.get("labels") or {}).items()
            }
            return rule["name"], labels
    return None


def test_mapping_turns_airflow_names_into_labelled_metrics():
    mapping = yaml.safe_load(MAPPING.read_text())
    assert statsd_map("airflow.ti.finish.helical_demo.load.success", mapping) == (
        "airflow_ti_finish",
        {"dag_id": "helical_demo", "task_id": "load", "state": "success"},
    )
    assert statsd_map("airflow.dagrun.duration.failed.helical_demo", mapping) == (
        "airflow_dagrun_duration_seconds",
        {"dag_id": "helical_demo", "state": "failed"},
    )
    assert statsd_map("airflow.ti_failures", mapping) == ("airflow_ti_failures", {})
    assert statsd_map("airflow.some.other", mapping) is None


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def source_of(expr: str) -> str:
    """Which exporter a panel's metric comes from."""
    metric = next(
        (
            n
            for n in re.findall(r"[a-zA-Z_][a-zA-Z0-9_]*", expr)
            if n.startswith(("helical_", "airflow_", "container_", "DCGM_", "node_"))
        ),
        "",
    )
    if metric == "helical_train_peak_gpu_memory_bytes":
        return "gpu"
    return {
        "helical": "pushgateway",
        "airflow": "statsd",
        "container": "cadvisor",
        "DCGM": "gpu",
        "node": "node-exporter",
    }[metric.split("_")[0]]


class StatsdCapture:
    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.names: set[str] = set()
        self.lines: list[str] = []  # every packet line, in order (``name:value|type``)
        self._stop = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while not self._stop:
            try:
                data, _ = self.sock.recvfrom(65535)
            except OSError:
                continue
            for line in data.decode(errors="replace").splitlines():
                self.names.add(line.split(":", 1)[0])
                self.lines.append(line)

    def count(self, name: str) -> int:
        """The total a StatsD counter ``name`` received (``name:1|c`` lines), as statsd_exporter would sum it."""
        return sum(
            int(float(line.split(":", 1)[1].split("|")[0]))
            for line in list(self.lines)
            if line.startswith(name + ":") and line.split("|")[1:2] == ["c"]
        )

    def stop(self):
        self._stop = True
        self.thread.join(timeout=5)
        self.sock.close()


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not come up")


def prom_query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.mark.slow
def test_dashboard_queries_return_data_after_a_dag_run(tmp_path, model_cache, workflow_env):
    procs = []
    pg, ne, pr = free_port(), free_port(), free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "pushgateway",
                        "honor_labels": True,
                        "static_configs": [{"targets": [f"127.0.0.1:{pg}"]}],
                    },
                    {"job_name": "node", "static_configs": [{"targets": [f"127.0.0.1:{ne}"]}]},
                ],
            }
        )
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    try:
        for name, cmd in (
            ("pushgateway", ["prometheus-pushgateway", f"--web.listen-address=127.0.0.1:{pg}"]),
            (
                "node",
                [
                    "prometheus-node-exporter",
                    f"--web.listen-address=127.0.0.1:{ne}",
                    "--collector.disable-defaults",
                    "--collector.cpu",
                    "--collector.meminfo",
                ],
            ),
            (
                "prometheus",
                [
                    "prometheus",
                    f"--config.file={cfg}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{pr}",
                ],
            ),
        ):
            procs.append(subprocess.Popen(cmd, stdout=open(logs / f"{name}.log", "w"), stderr=subprocess.STDOUT))
        wait_http(f"http://127.0.0.1:{pg}/metrics")
        wait_http(f"http://127.0.0.1:{pr}/-/ready")

        params = demo_params(tmp_path, model_cache=model_cache, fine_tune__epochs=1)
        broken = yaml.safe_load(params.read_text())
        broken.update(experiment="broken", profile="no-such-profile")
        (params.parent / "broken.yaml").write_text(yaml.safe_dump(broken))
        statsd = StatsdCapture()
        env = airflow_home(
            tmp_path,
            workflow_env,
            params.parent,
            HELICAL_PUSHGATEWAY=f"127.0.0.1:{pg}",
            AIRFLOW__METRICS__STATSD_ON="True",
            AIRFLOW__METRICS__STATSD_HOST="127.0.0.1",
            AIRFLOW__METRICS__STATSD_PORT=str(statsd.port),
            AIRFLOW__METRICS__STATSD_PREFIX="airflow",
        )
        r = run([AIRFLOW_BIN / "airflow", "dags", "test", "helical_demo"], env=env)
        failed = run([AIRFLOW_BIN / "airflow", "dags", "test", "helical_broken"], env=env)  # failures are counted too
        time.sleep(1)
        statsd.stop()
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        assert failed.returncode != 0
        time.sleep(4)  # a few scrapes

        proven, not_here = [], []
        for title, expr in dashboard_queries():
            src = source_of(expr)
            if src in ("pushgateway", "node-exporter"):
                result = prom_query(pr, expr)
                assert result, f"panel {title!r}: {expr} returned no data"
                proven.append(title)
            else:
                not_here.append((title, src))
        assert {
            "Workflow stage duration",
            "Stage outcome (1 = success)",
            "Model: test accuracy and macro-F1",
            "Host CPU busy",
            "Workflow run duration",
        } <= set(proven)
        (tmp_path / "proven.json").write_text(json.dumps({"proven": proven, "not_here": not_here}, indent=2))

        # Airflow's StatsD: every airflow_* series the dashboard uses is emitted and mapped
        mapping = yaml.safe_load(MAPPING.read_text())
        mapped = [m for m in (statsd_map(n, mapping) for n in statsd.names) if m]
        mapped_names = {m[0] for m in mapped}
        assert ("airflow_ti_finish", {"dag_id": "helical_demo", "task_id": "evaluate", "state": "success"}) in mapped
        assert ("airflow_ti_finish", {"dag_id": "helical_broken", "task_id": "load", "state": "failed"}) in mapped
        needed = {re.findall(r"airflow_[a-z_]+", e)[0] for _, e in dashboard_queries() if "airflow_" in e}
        scheduler_only = {"airflow_dagrun_duration_seconds"}  # `dags test` runs no scheduler (see FACTS)
        assert needed - scheduler_only <= mapped_names, (needed, sorted(statsd.names)[:50])
        assert (
            statsd_map("airflow.dagrun.duration.success.helical_demo", mapping)[0] == "airflow_dagrun_duration_seconds"
        )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
