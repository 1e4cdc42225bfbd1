"""The stage table is the one declaration: notebooks, metrics, the dashboard and shards all agree with it."""

from __future__ import annotations

import json
import re

import nbformat
import pytest

from helical_workflow import stages
from helical_workflow.stages import Shard

from .conftest import ROOT


def test_shards_parse_name_and_cover_every_row_once():
    s = Shard.parse("1/4")
    assert (s.i, s.n, str(s), s.name) == (1, 4, "1/4", "shard-00001-of-00004")
    assert Shard.parse(None) is None and Shard.parse(s) is s
    for bad in ("4/4", "1-4", "-1/2"):
        with pytest.raises(ValueError):
            Shard.parse(bad)
    rows = [r for sh in Shard.all(3) for r in range(*sh.bounds(10))]
    assert rows == list(range(10))


def test_every_stage_has_a_parameterised_output_free_notebook():
    for st in stages.STAGES:
        nb = nbformat.read(ROOT / "notebooks" / st.notebook, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert "parameters" in code[0].metadata.get("tags", []), st.notebook
        assert all(not c.outputs and c.execution_count is None for c in code), f"{st.notebook} has outputs"
        assert nb.metadata.kernelspec.name == "helical-workflow"
        assert all(u in stages.names() for u in st.upstream)


def test_notebooks_are_stripped_by_a_git_filter():
    assert "*.ipynb filter=nbstripout" in (ROOT / ".gitattributes").read_text()


def test_every_helical_metric_on_the_dashboard_is_declared():
    dash = json.loads((ROOT / "compose" / "grafana" / "dashboards" / "helical-workflow.json").read_text())
    queried = {
        m for p in dash["panels"] for t in p.get("targets", []) for m in re.findall(r"\bhelical_[a-z0-9_]+", t["expr"])
    }
    declared = stages.all_metrics()
    assert queried, "the dashboard queries no helical_ metric"
    assert queried <= set(declared), queried - set(declared)


def test_notebooks_only_write_declared_metrics():
    declared = {m.name for m in stages.all_metrics().values()}
    for st in stages.STAGES:
        src = "\n".join(c.source for c in nbformat.read(ROOT / "notebooks" / st.notebook, as_version=4).cells)
        for name in re.findall(r'm\.set\(f?"(helical_[a-z0-9_{}]+)"', src):
            if "{" in name:  # f-string: every declared expansion counts
                prefix = name.split("{")[0]
                assert any(d.startswith(prefix) for d in (m.name for m in st.metrics)), name
            else:
                assert st.metric(name).name in declared, name


def test_undeclared_metric_names_the_fix():
    with pytest.raises(KeyError, match="not declared for stage 'load'.*Fix: add it"):
        stages.get("load").metric("helical_made_up")
