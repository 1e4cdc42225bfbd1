"""`make bench`: every benchmark, each printing its ratios against the reference measured in the same run.

`make bench QUICK=1` (``--quick``): the same benchmarks on small inputs, to check in a few minutes that they run
and what their ratios look like (the numbers worth quoting come from the full run); the sweep benchmark, which
runs the whole workflow nine times, is left out.
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
quick = "--quick" in sys.argv[1:]
extra = [a for a in sys.argv[1:] if a != "--quick"]
if quick:
    plan = (
        ("tokenize_bench.py", ["--sizes", "2000", "--helical-cells", "2000", "--repeat", "1", *extra]),
        ("train_bench.py", ["--synthetic", "--cells", "40"]),
        ("annotate_bench.py", ["--sizes", "300", "--helical-sizes", "300"]),
    )
else:
    plan = (
        ("tokenize_bench.py", extra),
        ("train_bench.py", []),
        ("train_bench.py", ["--synthetic", "--cells", "600"]),
        ("sweep_bench.py", []),
        ("annotate_bench.py", []),
    )
status = 0
for script, args in plan:
    print(f"\n=== {script} {' '.join(args)} ===", flush=True)
    status |= subprocess.run([sys.executable, str(HERE / script), *args]).returncode
if quick:
    print("\n(quick mode: small inputs, sweep_bench.py left out; `make bench` runs everything at full size)")
sys.exit(status)
