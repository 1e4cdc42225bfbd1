"""A sweep against the same trials as separate runs, measured in the same process, one after the other.

The sweep (`params/demo_sweep.yaml`, through `helical-workflow run`) loads and tokenizes once and then runs
fine_tune -> evaluate per trial and one compare; the reference runs the whole workflow once per trial, each with
the trial's overrides (`--set`). Both through the same launcher (papermill, local kernel), outputs in a
temporary folder. Prints the wall times and their ratio.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from helical_workflow import sweep  # noqa: E402
from helical_workflow.params import load_params  # noqa: E402


def cli(*args: str, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "helical_workflow.cli", "run", *args, "--quiet"], env=env, capture_output=True, text=True
    )
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default=str(ROOT / "params" / "demo_sweep.yaml"))
    ap.add_argument("--epochs", type=int, default=1, help="fine_tune.epochs for every trial (both sides)")
    args = ap.parse_args()
    params = load_params(args.params)
    trials = sweep.trials(params)
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as out:
        env = {
            **os.environ,
            "HELICAL_WORKFLOW_OUTPUTS": out,
            "JUPYTER_PATH": str(ROOT / ".venv" / "jupyter" / "share" / "jupyter"),
        }
        epochs = f"fine_tune.epochs={args.epochs}"
        swept = cli(args.params, "--run-id", "sweep", "--set", epochs, env=env)
        separate = []
        for k, overrides in enumerate(trials):
            sets = [x for key, value in overrides.items() for x in ("--set", f"{key}={value}")]
            separate.append(
                cli(args.params, "--run-id", f"separate-{k}", "--set", "sweep=null", "--set", epochs, *sets, env=env)
            )
    total = sum(separate)
    print(f"{len(trials)} trials, {args.epochs} epoch(s) each")
    print(f"sweep (load + tokenize once):      {swept:7.1f} s")
    print(f"{len(trials)} separate runs:                {total:7.1f} s  ({', '.join(f'{s:.0f}' for s in separate)})")
    print(f"sweep / separate:                  {swept / total:7.2f}")


if __name__ == "__main__":
    main()
