"""JupyterLab, started here, offers the helical-workflow kernel and opens the notebooks."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from .conftest import JUPYTER_PATH, KERNEL_PY, ROOT, free_port

pytestmark = pytest.mark.slow


def test_jupyterlab_lists_the_kernel_and_the_notebooks(tmp_path):
    import os
    import subprocess

    port, token = free_port(), "test-token-123"
    env = {**os.environ, "JUPYTER_PATH": JUPYTER_PATH, "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"), "JUPYTER_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.Popen(
        [KERNEL_PY.parent / "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT}", "--allow-root"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "lab.log", "w"),
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        specs = None
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/api/kernelspecs?token={token}", timeout=5) as r:
                    specs = json.load(r)
                break
            except OSError:
                time.sleep(1)
        assert specs is not None, "JupyterLab did not answer: " + (tmp_path / "lab.log").read_text()[-3000:]
        assert "helical-workflow" in specs["kernelspecs"]
        assert specs["kernelspecs"]["helical-workflow"]["spec"]["argv"][0] == str(KERNEL_PY)
        with urllib.request.urlopen(f"{url}/api/contents/notebooks?token={token}", timeout=10) as r:
            names = {c["name"] for c in json.load(r)["content"]}
        assert names >= {"01_load.ipynb", "02_tokenize.ipynb", "03_fine_tune.ipynb", "04_evaluate.ipynb"}
        with urllib.request.urlopen(f"{url}/lab?token={token}", timeout=10) as r:
            assert r.status == 200
        # without the token the server refuses
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{url}/api/kernelspecs", timeout=10)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
