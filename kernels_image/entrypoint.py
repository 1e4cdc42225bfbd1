"""Entry point of the kernel image.

No arguments: print the model metadata and the environment (versions, baked model files, GPU) and exit 0.
Arguments: run a workflow stage (`stage PARAMS STAGE RUN_ID [--shard I/N]`, what Airflow's docker launcher
does), or papermill on the notebook they name (`NOTEBOOK.ipynb OUTPUT.ipynb [papermill options]`).
"""

import json
import os
import sys
from importlib import metadata
from pathlib import Path


def describe() -> int:
    import torch

    root = Path(os.environ.get("CACHE_DIR_HELICAL_PREFIX", "/opt/models")) / ".cache" / "helical" / "models"
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != ".gitkeep")
    info = {
        "model_name": os.environ.get("HELICAL_MODEL_NAME"),
        "model_files": files,
        "versions": {p: metadata.version(p) for p in ("helical", "torch", "transformers", "papermill",
                                                       "helical-workflow", "anndata", "mlflow")},
        "python": sys.version.split()[0],
        "cuda_available": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "user": os.getuid(),
        "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE"),
    }
    print(json.dumps(info, indent=2))
    return 0


def main(argv: list[str]) -> int:
    if not argv:
        return describe()
    if argv[0] == "stage":
        from helical_workflow.launch import run_stage

        params, stage, run_id, *rest = argv[1:]
        shard = rest[1] if rest[:1] == ["--shard"] else None
        res = run_stage(params, stage, run_id, shard=shard)
        print(f"{stage}: {res.status} in {res.seconds:.1f} s -> {res.run_dir}")
        return 0
    import papermill.cli

    sys.argv = ["papermill", *argv]
    return papermill.cli.papermill() or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
