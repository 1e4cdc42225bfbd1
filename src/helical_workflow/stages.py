"""The stage table: every stage of the workflow, declared once.

A stage has a name, a notebook, upstream stages, the run-folder output it writes, how it
shards (not at all, over row ranges, or over a sweep's trials) and the Prometheus metrics it
reports. The DAG factory, the launchers, the CLI, the notebooks, the run folder and the
Grafana dashboard all read this table. Adding a stage is one entry and one notebook.

Two workflows share the engine: training (:data:`STAGES`: load → tokenize → fine_tune →
evaluate → compare) and annotation of new data with a trained model (:data:`ANNOTATE_STAGES`:
annotate_prepare → annotate → annotate_finish). Each run belongs to one of them.

Light on purpose (standard library only): Airflow imports it at DAG parse time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .params import Params


@dataclass(frozen=True, order=True)
class Shard:
    """Part ``i`` (0-based) of ``n`` of a sharded stage: one mapped Airflow task.

    ``kind`` says what is split: ``shard`` (row ranges of the data) or ``trial`` (a sweep's trials).
    """

    i: int
    n: int
    kind: Literal["shard", "trial"] = "shard"

    def __post_init__(self) -> None:
        if self.n < 1 or not 0 <= self.i < self.n:
            raise ValueError(f"{self.kind} {self.i}/{self.n}: need 0 <= I < N")

    @classmethod
    def parse(cls, value: "Shard | str | None", kind: Literal["shard", "trial"] = "shard") -> "Shard | None":
        """``'I/N'`` (what papermill and the command line pass) -> Shard; None stays None."""
        if value is None or isinstance(value, Shard):
            return value
        text = str(value).strip()
        if not text or text.lower() == "none":
            return None
        try:
            i, n = (int(x) for x in text.split("/"))
        except ValueError:
            raise ValueError(f"{kind} {value!r} is not of the form I/N (e.g. 0/4)") from None
        return cls(i, n, kind)

    @classmethod
    def all(cls, n: int, kind: Literal["shard", "trial"] = "shard") -> list["Shard"]:
        return [cls(i, n, kind) for i in range(n)]

    def __str__(self) -> str:
        return f"{self.i}/{self.n}"

    @property
    def name(self) -> str:
        """Folder, run.json key, notebook and metrics-file suffix: ``shard-0000i-of-0000n`` (or ``trial-...``)."""
        return f"{self.kind}-{self.i:05d}-of-{self.n:05d}"

    def bounds(self, total: int) -> tuple[int, int]:
        """The [start, stop) of this shard's rows among ``total`` (contiguous, near-equal ranges)."""
        return self.i * total // self.n, (self.i + 1) * total // self.n


@dataclass(frozen=True)
class Metric:
    """A Prometheus metric a stage writes (labels ``experiment`` and ``stage`` are always added)."""

    name: str
    kind: Literal["gauge", "counter"]
    help: str
    labels: tuple[str, ...] = ()

    @property
    def series(self) -> str:
        """The name Prometheus stores (prometheus-client appends ``_total`` to counters)."""
        return self.name + "_total" if self.kind == "counter" else self.name


def _gauge(name: str, help: str, *labels: str) -> Metric:
    return Metric(name, "gauge", help, labels)


def _counter(name: str, help: str, *labels: str) -> Metric:
    return Metric(name, "counter", help, labels)


CELLS = _counter("helical_cells_processed", "Cells processed by the stage")
GENES = _counter("helical_genes_processed", "Genes considered by the stage")

# Written by every stage attempt, whatever the stage (launcher and notebook side).
WORK_METRICS = (_gauge("helical_stage_work_seconds", "Time spent in the stage's work"),)
STATUS_METRICS = (
    _gauge("helical_stage_duration_seconds", "Wall time of the last stage attempt"),
    _gauge("helical_stage_success", "1 if the last stage attempt succeeded"),
    _gauge("helical_stage_last_run_timestamp_seconds", "When the last stage attempt ended"),
    _counter("helical_stage_runs", "Stage attempts by outcome", "status"),
    _gauge("helical_workflow_duration_seconds", "Wall time of the workflow run, first stage to last"),
)


@dataclass(frozen=True)
class Stage:
    name: str
    notebook: str
    upstream: tuple[str, ...]
    output: str
    metrics: tuple[Metric, ...] = ()
    sharding: Literal["none", "rows", "trials"] = "none"
    shards_param: str | None = None  # dotted params field holding the shard count (sharding "rows")
    description: str = ""
    needs: Literal["all", "any"] = "all"  # "any": runs when at least one upstream task succeeded (after a sweep)
    artifacts: bool = False  # log the output folder to MLflow after a successful attempt (small outputs only)
    workflow: Literal["train", "annotate"] = "train"  # which table (and which runs) the stage belongs to
    emits: str | None = None  # an Airflow asset (by name) with an event per successful task: its output's event.json
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def shard_count(self, params: "Params | None") -> int:
        if params is None or self.sharding == "none":
            return 1
        if self.sharding == "trials":
            return 1 if params.sweep is None else params.sweep.count()
        section, name = self.shards_param.split(".")
        return int(getattr(getattr(params, section), name))

    def shards(self, params: "Params | None") -> list[Shard | None]:
        """One entry per task: ``[None]`` for an unsharded stage (or one shard of one); a sweep's trials
        are always trials, even one."""
        n = self.shard_count(params)
        if self.sharding == "trials" and params is not None and params.sweep is not None:
            return list(Shard.all(n, "trial"))
        return [None] if n == 1 else list(Shard.all(n))

    @property
    def shard_kind(self) -> Literal["shard", "trial"]:
        return "trial" if self.sharding == "trials" else "shard"

    def key(self, shard: Shard | None) -> str:
        """The run.json key of one attempt: ``stage`` or ``stage.shard-0000i-of-0000n``."""
        return self.name if shard is None else f"{self.name}.{shard.name}"

    def keys(self, params: "Params | None") -> list[str]:
        return [self.key(s) for s in self.shards(params)]

    def notebook_name(self, shard: Shard | None) -> str:
        """The executed notebook's file name in the run folder."""
        stem = self.notebook.removesuffix(".ipynb")
        return f"{stem}.ipynb" if shard is None else f"{stem}.{shard.name}.ipynb"

    def metric(self, name: str) -> Metric:
        for m in (*self.metrics, *WORK_METRICS, *STATUS_METRICS):
            if m.name == name or m.series == name:
                return m
        declared = ", ".join(m.name for m in self.metrics) or "none"
        raise KeyError(
            f"metric {name!r} is not declared for stage {self.name!r} (declared: {declared}). "
            "Fix: add it to the stage's entry in helical_workflow.stages.STAGES."
        )


STAGES: tuple[Stage, ...] = (
    Stage(
        "load",
        "01_load.ipynb",
        (),
        "load",
        metrics=(CELLS, GENES),
        description="open the .h5ad in backed mode, QC, split (stratified; grouped by donor when asked)",
    ),
    Stage(
        "tokenize",
        "02_tokenize.ipynb",
        ("load",),
        "tokenized",
        sharding="rows",
        shards_param="tokenize.shards",
        metrics=(
            CELLS,
            GENES,
            _gauge("helical_tokenize_cells_per_second", "Tokenizer throughput"),
            _gauge("helical_gene_coverage_ratio", "Share of genes in the vocabulary"),
        ),
        description="rank-value tokens for Geneformer, streamed into Arrow shards",
    ),
    Stage(
        "fine_tune",
        "03_fine_tune.ipynb",
        ("tokenize",),
        "model",
        sharding="trials",
        metrics=(
            _gauge("helical_train_cells_per_second", "Training throughput"),
            _gauge("helical_validation_accuracy", "Validation accuracy of the kept model"),
            _gauge("helical_validation_macro_f1", "Validation macro-F1 of the kept model"),
            _gauge("helical_train_peak_gpu_memory_bytes", "Peak GPU memory in training"),
        ),
        description="fine-tune Geneformer with a classification head (batched, mixed precision)",
    ),
    Stage(
        "evaluate",
        "04_evaluate.ipynb",
        ("fine_tune",),
        "evaluate",
        sharding="trials",
        metrics=(
            CELLS,
            _gauge("helical_model_accuracy", "Test accuracy"),
            _gauge("helical_model_macro_f1", "Test macro-F1"),
        ),
        artifacts=True,
        description="predictions, logits, embeddings, metrics and plots on the test split",
    ),
    Stage(
        "compare",
        "05_compare.ipynb",
        ("evaluate",),
        "compare",
        needs="any",
        artifacts=True,
        metrics=(
            _gauge("helical_trials", "Trials compared, by outcome", "status"),
            _gauge("helical_best_validation_score", "The winner's validation score (the sweep metric)"),
            _gauge("helical_champion_promoted", "1 if this run's model became the registry's champion"),
        ),
        description="rank the trials (or runs), baselines, register the winner, promote the champion",
    ),
)  # end of STAGES

# Annotation of new data with a trained model: one run per DAG run (or command), whatever number of inputs.
# Each input's results go to its content-addressed folder ``annotate/<sha256[:12]>-<stem>/<model key>/``, so
# that the same content is never annotated twice by the same model version.
ANNOTATE_STAGES: tuple[Stage, ...] = (
    Stage(
        "annotate_prepare",
        "06_annotate_prepare.ipynb",
        (),
        "prepare",
        workflow="annotate",
        metrics=(CELLS, _gauge("helical_annotate_inputs", "Inputs of the run, by outcome", "status")),
        description="check each input and the model (gene coverage); skip content this model version annotated",
    ),
    Stage(
        "annotate",
        "07_annotate.ipynb",
        ("annotate_prepare",),
        "shards",
        workflow="annotate",
        sharding="rows",
        shards_param="annotate.shards",
        metrics=(CELLS, _gauge("helical_annotate_cells_per_second", "Annotation throughput")),
        description="tokenize and predict one row range of every input (batched inference, no gradients)",
    ),
    Stage(
        "annotate_finish",
        "08_annotate_report.ipynb",
        ("annotate",),
        "annotations",
        workflow="annotate",
        metrics=(CELLS,),
        emits="helical_annotated",
        description="merge the shards into predictions, embeddings and annotated.h5ad; the report",
    ),
)

WORKFLOWS: dict[str, tuple[Stage, ...]] = {"train": STAGES, "annotate": ANNOTATE_STAGES}


def table(workflow: str = "train") -> tuple[Stage, ...]:
    try:
        return WORKFLOWS[workflow]
    except KeyError:
        raise KeyError(f"unknown workflow {workflow!r}; workflows: {', '.join(WORKFLOWS)}") from None


def names(workflow: str | None = "train") -> tuple[str, ...]:
    """The stage names of one workflow (None: of all of them)."""
    stages = [s for w in WORKFLOWS.values() for s in w] if workflow is None else table(workflow)
    return tuple(s.name for s in stages)


def get(name: str) -> Stage:
    for w in WORKFLOWS.values():
        for s in w:
            if s.name == name:
                return s
    raise KeyError(f"unknown stage {name!r}; stages: {', '.join(names(None))}")


def producer(output: str, workflow: str = "train") -> Stage:
    """The stage that writes run-folder output ``output``."""
    for s in table(workflow):
        if s.output == output:
            return s
    raise KeyError(f"no stage writes {output!r}")


def last(workflow: str = "train") -> Stage:
    """The stage after which a run of the workflow is complete (nothing downstream of it)."""
    stages = table(workflow)
    downstream = {u for s in stages for u in s.upstream}
    return [s for s in stages if s.name not in downstream][-1]


def all_metrics() -> dict[str, Metric]:
    """Every declared metric by the series name Prometheus stores (what dashboards query)."""
    out: dict[str, Metric] = {}
    every = (s for w in WORKFLOWS.values() for s in w)
    for m in (*WORK_METRICS, *STATUS_METRICS, *(m for s in every for m in s.metrics)):
        out[m.series] = m
    return out
