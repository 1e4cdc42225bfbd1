"""``helical-workflow``: validate params, run the workflow without Airflow, helpers."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from . import stages
from .params import ParamsError, load_params, parse_set
from .runs import StageFailed
from .stages import Shard


def _deep_check(params) -> str:
    """Dataset checks that need anndata (kernel environment); skipped where it is not installed."""
    try:
        import anndata  # noqa: F401
        import h5py  # noqa: F401
    except ImportError:
        return "dataset contents not checked here (anndata is not installed in this environment)"
    from .data import DatasetError, check_dataset

    try:
        info = check_dataset(params)
    except DatasetError as e:
        raise ParamsError(params.source_path, [str(e)]) from None
    labels = f"{info['n_labels']} labels in {params.data.label_key!r}"
    return f"dataset: {info['n_cells']} cells, {info['n_genes']} genes, {labels}"


def cmd_validate(args: argparse.Namespace) -> int:
    status = 0
    from .params import data_file_problems

    for path in args.params:
        if Path(path).name == "profiles.yaml":
            try:
                from .params import load_profiles

                print(f"OK {path}: profiles {', '.join(load_profiles(Path(path)))}")
            except ParamsError as e:
                print(f"INVALID {e}", file=sys.stderr)
                status = 1
            continue
        try:
            params = load_params(path, check_files=False)
            file_problems = data_file_problems(params)
            if file_problems and not file_problems[0].startswith("data.path: file not found"):
                raise ParamsError(path, file_problems)
            if file_problems:
                detail = f"WARNING {file_problems[0]} Runs stop before any compute until it exists."
            else:
                detail = _deep_check(params)
        except ParamsError as e:
            print(f"INVALID {e}", file=sys.stderr)
            status = 1
            continue
        print(
            f"OK {path}: experiment {params.experiment!r}, model {params.model.name} ({params.model.source}), "
            f"profile {params.profile}; {detail}"
        )
    return status


def cmd_run(args: argparse.Namespace) -> int:
    from . import launchers

    run_id = args.run_id or "manual__" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    only = tuple(args.stages.split(",")) if args.stages else None
    unknown = [s for s in only or () if s not in stages.names()]
    if unknown:
        print(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(stages.names())}", file=sys.stderr)
        return 2
    # run_workflow validates the params file before any stage starts
    overrides = _explained(parse_set, args.set or [])
    if isinstance(overrides, int):
        return overrides
    run = _explained(
        launchers.run_workflow,
        args.params,
        run_id,
        only,
        overrides=overrides,
        kernel_name=args.kernel,
        log_output=not args.quiet,
    )
    if isinstance(run, int):
        return run
    print_reports(run.dir)
    return 0


def _explained(fn, *args, **kw):
    """``fn``'s result; an invalid params file (exit 2) or a failed stage (exit 1) explained on stderr."""
    try:
        return fn(*args, **kw)
    except ParamsError as e:
        print(f"INVALID {e}", file=sys.stderr)
        return 2
    except StageFailed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1


def cmd_stage(args: argparse.Namespace) -> int:
    """One stage attempt inside the kernel image (what the docker and kubernetes launchers start)."""
    from . import launchers

    a = _explained(launchers.run_stage_in_image, args.stage, args.run_id, args.experiment, shard=args.shard)
    if isinstance(a, int):
        return a
    print(f"{a.key}: {a.status} in {a.seconds:.1f} s")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    """What the kernel image holds: model files, versions, GPUs (the image's default command)."""
    import torch

    from .runs import package_versions

    root = Path(os.environ.get("CACHE_DIR_HELICAL_PREFIX", Path.home())) / ".cache" / "helical" / "models"
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != ".gitkeep")
    info = {
        "model_name": os.environ.get("HELICAL_MODEL_NAME"),
        "model_files": files,
        "versions": package_versions(),
        "python": sys.version.split()[0],
        "cuda_available": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "user": os.getuid(),
        "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE"),
        "stages": list(stages.names()),
    }
    print(json.dumps(info, indent=2))
    return 0


def run_status(manifest: dict) -> str:
    """One line: complete, or not (which stages failed, are running, or have not run)."""
    recorded = manifest.get("stages", {})
    by_status: dict[str, list[str]] = {}
    for key, info in recorded.items():
        by_status.setdefault(str(info.get("status")), []).append(key)
    last = stages.last().name
    if recorded.get(last, {}).get("status") == "success" and not by_status.get("running"):
        failed = by_status.get("failed")
        return "Status: complete" + (f" (failed, the others went on: {', '.join(sorted(failed))})" if failed else "")
    parts = [f"{s}: {', '.join(sorted(keys))}" for s, keys in sorted(by_status.items()) if s != "success"]
    missing = [name for name in stages.names() if not any(k.split(".")[0] == name for k in recorded)]
    if missing:
        parts.append(f"not run: {', '.join(missing)}")
    return "Status: INCOMPLETE (" + "; ".join(parts) + ")"


def print_reports(run_dir: Path) -> None:
    from .runs import read_manifest

    m = read_manifest(run_dir)
    print(f"\nRun folder: {run_dir}")
    print(run_status(m))
    recorded = m.get("stages", {})
    order = {name: i for i, name in enumerate(stages.names())}
    keys = sorted(recorded, key=lambda k: (order.get(k.split(".")[0], len(order)), k))  # table order, then shard
    width = max((len(k) for k in keys), default=10)
    for st in keys:
        info = recorded[st]
        print(f"  {st:<{width}s}  {str(info.get('status')):<8s} {info.get('seconds') or 0:8.1f}s")
    print(f"Reports (executed notebooks): {run_dir / 'notebooks'}")
    print(f"Reports (HTML):               {run_dir / 'reports'}")
    metrics = run_dir / stages.get("evaluate").output / "metrics.json"
    if metrics.exists():
        mj = json.loads(metrics.read_text())
        lr, fr = mj["baseline_logreg"], mj.get("baseline_frozen", {})
        print(
            f"Test accuracy {mj['accuracy']:.3f}, macro-F1 {mj['macro_f1']:.3f} (majority class "
            f"{mj['chance_accuracy']:.3f}; logistic regression on expression {lr.get('accuracy', float('nan')):.3f} "
            f"/ {lr.get('macro_f1', float('nan')):.3f}, on frozen embeddings {fr.get('accuracy', float('nan')):.3f} "
            f"/ {fr.get('macro_f1', float('nan')):.3f})"
        )
    summary = run_dir / stages.get("compare").output / "summary.json"
    if summary.exists():
        from .compare import winner_sentence

        print(winner_sentence(json.loads(summary.read_text())))
    if m.get("mlflow"):
        print(f"MLflow run {m['mlflow']['run_id']} in {m['mlflow']['tracking_uri']}")


def cmd_finalize(args: argparse.Namespace) -> int:
    """Render the executed notebook to HTML and log it to the run's MLflow run (kernel environment)."""
    from .runs import Attempt, Run

    run = Run.load(args.run_dir)
    st = stages.get(args.stage)
    shard = Shard.parse(args.shard, st.shard_kind)
    run.finalize(Attempt(st, shard, run.dir, status=args.status, seconds=args.seconds))
    return 0


def cmd_mlflow_sync(args: argparse.Namespace) -> int:
    """Send the MLflow calls a run kept while the tracking server was unreachable (its trials' too)."""
    from .runs import Run, pinned
    from .tracking import PENDING, MlflowRun

    run_dir = Path(args.run_dir).resolve()
    if pinned(run_dir) is None:
        print(f"{run_dir} is not a run folder (no params/<experiment>.yaml). Fix: give outputs/<experiment>/<run id>")
        return 2
    run = Run.load(run_dir)
    failed = total = 0
    for d in [run_dir, *sorted(p.parent for p in run_dir.glob(f"trials/*/{PENDING}"))]:
        ml = MlflowRun.of(run if d == run_dir else Run(run.params, d, root=run))
        if not ml.pending():
            continue
        sent = ml.flush()
        if sent is None:
            failed += 1
            print(f"{d}: MLflow at {ml.uri} still unreachable; {ml.pending()} call(s) kept. Fix: start it, then again.")
        else:
            total += sent
            print(f"{d}: {sent} kept call(s) sent to {ml.uri}")
    if not failed and not total:
        print(f"{run_dir}: nothing kept, MLflow has everything")
    return 1 if failed else 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from .data import make_demo_dataset

    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"{out} exists")
        return 0
    make_demo_dataset(out)
    print(f"wrote {out}")
    return 0


def cmd_to_csr(args: argparse.Namespace) -> int:
    """Convert an .h5ad whose matrices are CSC into CSR (loads the file in memory once)."""
    import anndata
    import scipy.sparse as sp

    ad = anndata.read_h5ad(args.input)
    if sp.issparse(ad.X):
        ad.X = ad.X.tocsr()
    for k in list(ad.layers):
        if sp.issparse(ad.layers[k]):
            ad.layers[k] = ad.layers[k].tocsr()
    if ad.raw is not None and sp.issparse(ad.raw.X):
        ad.raw = anndata.AnnData(X=ad.raw.X.tocsr(), var=ad.raw.var, obs=ad.obs[[]])
    ad.write_h5ad(args.output)
    print(f"wrote {args.output}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Print where the latest (or a given) run of a params file put its reports."""
    from .runs import run_dir_for

    params = load_params(args.params, check_files=False)
    exp_dir = params.outputs_path / params.experiment
    if args.run_id:
        run_dir = run_dir_for(params.outputs_path, params.experiment, args.run_id)
    else:
        runs_ = (
            sorted((p for p in exp_dir.glob("*/run.json")), key=lambda p: p.stat().st_mtime) if exp_dir.is_dir() else []
        )
        if not runs_:
            print(f"no runs of {params.experiment!r} under {exp_dir}", file=sys.stderr)
            return 1
        run_dir = runs_[-1].parent
    print_reports(run_dir)
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    """Streamed, token-identical-to-helical tokenization of an .h5ad into Arrow (datasets) shards."""
    from .data import DatasetError
    from .tokenize import TokenizeError, tokenize_h5ad

    try:
        res = tokenize_h5ad(
            Path(args.input),
            Path(args.output),
            model_name=args.model,
            dict_dir=Path(args.model_dir),
            label_key=args.label_key,
            gene_names=args.gene_names,
            gene_id_type=args.gene_id_type,
            counts=args.counts,
            shard=Shard.parse(args.shard),
            workers=args.workers,
            chunk_size=args.chunk_size,
        )
    except (TokenizeError, DatasetError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    cov = res.coverage
    print(
        f"{res.cells} cells -> {res.out_dir} in {res.seconds:.1f} s ({res.cells_per_second:,.0f} cells/s); "
        f"genes in vocabulary {cov['in_vocabulary']}/{cov['genes']}; "
        f"zero-count cells dropped: {res.dropped_zero_count}; "
        f"cells without a label: {res.missing_labels}"
    )
    return 0


def cmd_annotate(args: argparse.Namespace) -> int:
    """An annotation run of the stage engine (prepare, annotate by shard, finish), each stage by its profile's
    launcher, as the ``helical_annotate`` DAG runs it."""
    from . import annotate as an
    from . import launchers

    params_path = Path(args.params or launchers.project_root() / "params" / "demo.yaml")
    model = args.model
    if model and not str(model).startswith("models:/"):
        model = str(Path(model).expanduser().resolve())  # a folder, relative to where the command runs
    overrides: dict[str, object] = {"annotate.inputs": [str(Path(args.input).expanduser().resolve())]}
    for key, value in (
        ("annotate.model", model),
        ("annotate.min_confidence", args.min_confidence),
        ("annotate.shards", args.shards),
        ("annotate.gene_names", args.gene_names),
        ("annotate.gene_id_type", args.gene_id_type),
        ("annotate.force", args.force or None),
        ("outputs_dir", str(Path(args.out).resolve()) if args.out else None),
    ):
        if value is not None:
            overrides[key] = value
    run_id = args.run_id or "annotate__" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%f")
    try:
        run = launchers.run_workflow(
            params_path, run_id, overrides=overrides, workflow="annotate", kernel_name=args.kernel, log_output=False
        )
    except (ParamsError, StageFailed) as e:
        print(f"annotate failed: {e}", file=sys.stderr)
        return 2
    for a in an.load_summary(run.dir)["annotations"]:
        m = an.read_manifest(Path(a["run_dir"]))
        if a["already_annotated"]:
            print(f"already annotated by {a['model']} (same content, sha256 {m['sha256'][:12]}): {a['run_dir']}")
        merged = m.get("merged") or {}
        print(
            f"{merged.get('cells')} cells annotated with {a['model']} "
            f"(gene coverage {m['gene_coverage']['coverage']:.1%}; unassigned {merged.get('unassigned')}; "
            f"no tokens {merged.get('no_tokens')})"
        )
        for name, path in (merged.get("outputs") or {}).items():
            print(f"{name}: {path}")
        if m.get("report"):
            print(f"report: {m['report']}")
    print(f"run: {run.dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="helical-workflow", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    v = sub.add_parser("validate", help="check params files; explain every problem; exit 1 if any is invalid")
    v.add_argument("params", nargs="+")
    v.set_defaults(func=cmd_validate)

    r = sub.add_parser("run", help="run the stages without Airflow, each by its profile's launcher (as the DAG)")
    r.add_argument("params")
    r.add_argument("--run-id", default=None)
    r.add_argument("--stages", default=None, help=f"comma-separated subset of {','.join(stages.names())}")
    r.add_argument("--kernel", default="helical-workflow")
    r.add_argument("--quiet", action="store_true", help="do not stream cell output")
    r.add_argument(
        "--set",
        action="append",
        metavar="FIELD=VALUE",
        help="override a params field for this run (YAML value), e.g. --set fine_tune.epochs=2; repeatable",
    )
    r.set_defaults(func=cmd_run)

    # internal commands (the launchers call them): no help entry, so `--help` lists users' commands only
    s = sub.add_parser("stage", description="one stage attempt of a created run, in the kernel image")
    s.add_argument("stage", choices=stages.names(None))
    s.add_argument("run_id")
    s.add_argument("--experiment", required=True, help="the run folder is $HELICAL_WORKFLOW_OUTPUTS/EXPERIMENT/RUN_ID")
    s.add_argument("--shard", default=None, help="I/N: one row shard of a sharded stage")
    s.set_defaults(func=cmd_stage)

    de = sub.add_parser("describe", help="model files, versions and GPUs of this environment (the image's default)")
    de.set_defaults(func=cmd_describe)

    f = sub.add_parser("finalize-stage", description="report and MLflow logging of a stage attempt (kernel env)")
    f.add_argument("run_dir")
    f.add_argument("stage", choices=stages.names(None))
    f.add_argument("--status", default="success")
    f.add_argument("--shard", default=None)
    f.add_argument("--seconds", type=float, default=0.0)
    f.set_defaults(func=cmd_finalize)

    ms = sub.add_parser("mlflow-sync", help="send the MLflow logging a run kept while the server was unreachable")
    ms.add_argument("run_dir", help="the run folder (outputs/<experiment>/<run id>)")
    ms.set_defaults(func=cmd_mlflow_sync)

    t = sub.add_parser("tokenize", help="tokenize an .h5ad for Geneformer (streamed, backed mode) into Arrow shards")
    t.add_argument("input")
    t.add_argument("output", help="a datasets folder (load_from_disk), or with --shard a folder of shard-* folders")
    t.add_argument("--model", required=True, help="helical Geneformer model name (fixes input size, special tokens)")
    t.add_argument(
        "--model-dir",
        required=True,
        help="folder with token_dictionary.pkl, gene_median_dictionary.pkl, ensembl_mapping_dict.pkl",
    )
    t.add_argument("--label-key", default=None, help="obs column to carry as the label")
    t.add_argument("--gene-names", default="index", help="var column with gene names, or 'index'")
    t.add_argument("--gene-id-type", default="symbol", choices=["symbol", "ensembl"])
    t.add_argument("--counts", default="X", help="X, raw or layer:<name>")
    t.add_argument("--shard", default=None, help="I/N: tokenize only the I-th (0-based) of N row ranges")
    t.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    t.add_argument("--chunk-size", type=int, default=2048)
    t.set_defaults(func=cmd_tokenize)

    rp = sub.add_parser("report", help="show the latest run of a params file: stages, reports, metrics")
    rp.add_argument("params")
    rp.add_argument("--run-id", default=None)
    rp.set_defaults(func=cmd_report)

    d = sub.add_parser("demo-data", help="write the bundled demo dataset (scanpy's pbmc68k_reduced) as counts")
    d.add_argument("--out", default="data/pbmc68k_reduced_counts.h5ad")
    d.add_argument("--force", action="store_true")
    d.set_defaults(func=cmd_demo_data)

    c = sub.add_parser("to-csr", help="convert an .h5ad with CSC matrices to CSR so it can be streamed")
    c.add_argument("input")
    c.add_argument("output")
    c.set_defaults(func=cmd_to_csr)

    an = sub.add_parser("annotate", help="label the cells of any .h5ad with a fine-tuned model (predictions, report)")
    an.add_argument("input", help="the .h5ad to annotate (read in backed mode, never modified)")
    _annotate_options(an)
    an.add_argument("--run-id", default=None, help="the annotation run's id (default: annotate__<UTC time>)")
    an.add_argument("--kernel", default="helical-workflow", help="Jupyter kernel of the stages' notebooks")
    an.set_defaults(func=cmd_annotate)
    return p


def _annotate_options(a: argparse.ArgumentParser) -> None:
    a.add_argument(
        "--model",
        default=None,
        help="models:/<name>@<alias>, models:/<name>/<version>, or a run folder; default: the params "
        "file's annotate.model, else models:/<registry.name or experiment>@champion",
    )
    a.add_argument("--params", default=None, help="params file for profiles, tracking and outputs (default: demo)")
    a.add_argument("--out", default=None, help="outputs folder (annotations go to OUT/annotate/...)")
    a.add_argument("--min-confidence", type=float, default=None, help="below it a cell is 'unassigned'")
    a.add_argument("--shards", type=int, default=None, help="row-range shards (one after another here)")
    a.add_argument("--gene-names", default=None, help="var column with gene names, or 'index'")
    a.add_argument("--gene-id-type", default=None, choices=["symbol", "ensembl"])
    a.add_argument("--force", action="store_true", help="annotate again even if this content was annotated")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
