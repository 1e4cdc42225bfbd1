"""Sweeps: the trials of a params file's ``sweep:`` section, each a set of fine_tune overrides.

The trials are expanded by the schema (:meth:`helical_workflow.params.SweepParams.expand`: ``grid``,
``random`` or ``lhs``, deterministic for a seed); these are the run-level views of them, one trial with
no overrides when there is no sweep. Light for the DAG.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .params import Params


def trial_count(params: "Params") -> int:
    return 1 if params.sweep is None else params.sweep.count()


def trials(params: "Params") -> list[dict[str, Any]]:
    """The overrides of each trial (``{"fine_tune.learning_rate": 3e-4, ...}``), trial 0 first."""
    return [{}] if params.sweep is None else params.sweep.expand()


def varied(params: "Params") -> list[str]:
    """The fields a sweep varies."""
    return [] if params.sweep is None else params.sweep.varied()
