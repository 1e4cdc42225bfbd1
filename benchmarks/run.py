"""`make bench`: every benchmark, each printing its ratios against the reference measured in the same run."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
status = 0
for script, args in (
    ("tokenize_bench.py", sys.argv[1:] or []),
    ("train_bench.py", []),
    ("train_bench.py", ["--synthetic", "--cells", "600"]),
    ("sweep_bench.py", []),
    ("annotate_bench.py", []),
):
    print(f"\n=== {script} ===", flush=True)
    status |= subprocess.run([sys.executable, str(HERE / script), *args]).returncode
sys.exit(status)
