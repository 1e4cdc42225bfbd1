"""What the benchmarks share."""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """Largest peak RSS of this process and its (forked) workers, in MB.

    This process's own peak is VmHWM: ``ru_maxrss`` would carry over the peak of the
    process that launched it (Linux keeps it across exec), e.g. a benchmark driver that
    generated data before starting the measured run."""
    with open("/proc/self/status") as f:
        own = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024
