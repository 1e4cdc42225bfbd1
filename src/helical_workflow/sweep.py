"""Sweeps: the trials of a params file's ``sweep:`` section, each a set of fine_tune overrides.

* ``grid``: every combination of the listed values, in the order the fields are written;
* ``random``: ``trials`` independent draws from ``space`` (uniform, or log-uniform for ``log_scale``);
* ``lhs``: a Latin hypercube of ``trials`` points over ``space`` (scipy's ``qmc``), which covers every
  range evenly with few trials.

Deterministic for a seed. Light for the DAG (it only needs :func:`trial_count`); sampling a random or
Latin-hypercube sweep imports numpy/scipy when called.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .params import Params


def trial_count(params: "Params") -> int:
    sw = params.sweep
    if sw is None:
        return 1
    if sw.method == "grid":
        return math.prod(len(v) for v in sw.grid.values())
    return int(sw.trials or 1)


def trials(params: "Params") -> list[dict[str, Any]]:
    """The overrides of each trial (``{"fine_tune.learning_rate": 3e-4, ...}``), trial 0 first."""
    sw = params.sweep
    if sw is None:
        return [{}]
    if sw.method == "grid":
        keys = list(sw.grid)
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(sw.grid[k] for k in keys))]
    keys = list(sw.space)
    if sw.method == "lhs":
        from scipy.stats import qmc

        unit = qmc.LatinHypercube(d=len(keys), seed=sw.seed).random(sw.trials)
    else:
        import numpy as np

        unit = np.random.default_rng(sw.seed).random((sw.trials, len(keys)))
    out = []
    for row in unit:
        trial = {}
        for key, u in zip(keys, row, strict=True):
            lo, hi = sw.space[key]
            if key in sw.log_scale:
                value = math.exp(math.log(lo) + float(u) * (math.log(hi) - math.log(lo)))
            else:
                value = lo + float(u) * (hi - lo)
            trial[key] = round(value) if _is_int(key) else float(f"{value:.4g}")
        out.append(trial)
    return out


def _is_int(dotted: str) -> bool:
    """Whether a fine_tune field is an integer (epochs, freeze_layers, ...): its samples are rounded."""
    from .params import FineTuneParams

    ann = FineTuneParams.model_fields[dotted.split(".", 1)[1]].annotation
    return ann is int or int in getattr(ann, "__args__", ())


def varied(params: "Params") -> list[str]:
    """The fields a sweep varies."""
    sw = params.sweep
    return [] if sw is None else list(sw.grid or sw.space)
