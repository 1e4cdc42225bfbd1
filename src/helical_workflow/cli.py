"""``helical-workflow``: validate params, run the workflow without Airflow, helpers."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from .params import STAGES, ParamsError, load_params


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
    return f"dataset: {info['n_cells']} cells, {info['n_genes']} genes, {info['n_labels']} labels in {params.data.label_key!r}"


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
        print(f"OK {path}: experiment {params.experiment!r}, model {params.model.name} ({params.model.source}), "
              f"profile {params.profile}; {detail}")
    return status


def cmd_run(args: argparse.Namespace) -> int:
    from . import launch

    run_id = args.run_id or "manual__" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    stages = tuple(args.stages.split(",")) if args.stages else STAGES
    try:  # run_all validates the params file before any stage starts
        run_dir = launch.run_all(args.params, run_id, stages, kernel_name=args.kernel, log_output=not args.quiet)
    except ParamsError as e:
        print(f"INVALID {e}", file=sys.stderr)
        return 2
    except launch.StageFailed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    print_reports(run_dir)
    return 0


def print_reports(run_dir: Path) -> None:
    from .runs import read_manifest

    m = read_manifest(run_dir)
    print(f"\nRun folder: {run_dir}")
    for st, info in m.get("stages", {}).items():
        print(f"  {st:10s} {info.get('status')}  {info.get('seconds', 0):.1f}s")
    print(f"Reports (executed notebooks): {run_dir / 'notebooks'}")
    print(f"Reports (HTML):               {run_dir / 'reports'}")
    metrics = run_dir / "evaluate" / "metrics.json"
    if metrics.exists():
        mj = json.loads(metrics.read_text())
        print(f"Test accuracy {mj['accuracy']:.3f}, macro-F1 {mj['macro_f1']:.3f} "
              f"(chance {mj['chance_accuracy']:.3f}; logistic-regression baseline "
              f"{mj['baseline_logreg'].get('accuracy', float('nan')):.3f})")
    if m.get("mlflow"):
        print(f"MLflow run {m['mlflow']['run_id']} in {m['mlflow']['tracking_uri']}")


def cmd_finalize(args: argparse.Namespace) -> int:
    """Render the executed notebook to HTML and log it to the run's MLflow run."""
    import nbformat
    from nbconvert import HTMLExporter

    from . import launch, tracking

    params = load_params(args.params, check_files=False)
    run_dir = Path(args.run_dir)
    nb_path = Path(args.notebook) if args.notebook else run_dir / "notebooks" / launch.NOTEBOOKS[args.stage]
    key = args.key or args.stage
    html_path = run_dir / "reports" / nb_path.with_suffix(".html").name
    if nb_path.exists():
        nb = nbformat.read(nb_path, as_version=4)
        body, _ = HTMLExporter().from_notebook_node(nb)
        html_path.parent.mkdir(parents=True, exist_ok=True)
        html_path.write_text(body)
    from .runs import read_manifest

    st = read_manifest(run_dir).get("stages", {}).get(key, {})
    tracking.log_metrics(params, run_dir, {
        f"{key}.duration_seconds": float(st.get("seconds", 0.0)),
        f"{key}.success": 1.0 if args.status == "success" else 0.0,
    })
    for p, where in ((nb_path, "notebooks"), (html_path, "reports"), (run_dir / "metrics", "metrics"),
                     (run_dir / "run.json", None)):
        tracking.log_artifacts(params, run_dir, p, where)
    if args.status != "success":
        tracking.set_mlflow_status(params, run_dir, "FAILED")
    elif args.stage == STAGES[-1]:
        tracking.set_mlflow_status(params, run_dir, "FINISHED")
    print(f"report: {html_path}")
    return 0


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
        runs_ = sorted((p for p in exp_dir.glob("*/run.json")), key=lambda p: p.stat().st_mtime) if exp_dir.is_dir() else []
        if not runs_:
            print(f"no runs of {params.experiment!r} under {exp_dir}", file=sys.stderr)
            return 1
        run_dir = runs_[-1].parent
    print_reports(run_dir)
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    """Streamed, token-identical-to-helical tokenization of an .h5ad into Arrow (datasets) shards."""
    from .data import DatasetError
    from .tokenize import TokenizeError, parse_shard, tokenize_h5ad

    try:
        res = tokenize_h5ad(
            Path(args.input), Path(args.output), model_name=args.model, dict_dir=Path(args.model_dir),
            label_key=args.label_key, gene_names=args.gene_names, gene_id_type=args.gene_id_type,
            counts=args.counts, shard=parse_shard(args.shard), workers=args.workers, chunk_size=args.chunk_size,
        )
    except (TokenizeError, DatasetError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    cov = res.coverage
    print(f"{res.cells} cells -> {res.out_dir} in {res.seconds:.1f} s ({res.cells_per_second:,.0f} cells/s); "
          f"genes in vocabulary {cov['in_vocabulary']}/{cov['genes']}; zero-count cells dropped: {res.dropped_zero_count}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="helical-workflow", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check params files; explain every problem; exit 1 if any is invalid")
    v.add_argument("params", nargs="+")
    v.set_defaults(func=cmd_validate)

    r = sub.add_parser("run", help="run the stages with papermill, without Airflow (same launch code as the DAG)")
    r.add_argument("params")
    r.add_argument("--run-id", default=None)
    r.add_argument("--stages", default=None, help=f"comma-separated subset of {','.join(STAGES)}")
    r.add_argument("--kernel", default="helical-workflow")
    r.add_argument("--quiet", action="store_true", help="do not stream cell output")
    r.set_defaults(func=cmd_run)

    f = sub.add_parser("finalize-stage", help=argparse.SUPPRESS)
    f.add_argument("params")
    f.add_argument("run_dir")
    f.add_argument("stage", choices=STAGES)
    f.add_argument("--status", default="success")
    f.add_argument("--key", default=None)
    f.add_argument("--notebook", default=None)
    f.set_defaults(func=cmd_finalize)

    t = sub.add_parser("tokenize", help="tokenize an .h5ad for Geneformer (streamed, backed mode) into Arrow shards")
    t.add_argument("input")
    t.add_argument("output", help="a datasets folder (load_from_disk), or with --shard a folder of shard-* folders")
    t.add_argument("--model", required=True, help="helical Geneformer model name (fixes input size, special tokens)")
    t.add_argument("--model-dir", required=True, help="folder with token_dictionary.pkl, gene_median_dictionary.pkl, ensembl_mapping_dict.pkl")
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
