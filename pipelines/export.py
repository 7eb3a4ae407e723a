"""Export a model to ONNX (dynamic batch), check it against PyTorch in onnxruntime, optionally register it.

    python pipelines/export.py --model models:/vitpose-student@champion --out student.onnx
    python pipelines/export.py --model models:/vitpose-student@champion --register vitpose-student-onnx --alias champion

The exported graph is the network only: normalised crops ``images`` (N, 3, H, W) → ``heatmaps``
(N, K, H/4, W/4); the spec and keypoint metadata ride in the file's metadata_props. Parity: the same
seeded crops go through PyTorch and onnxruntime at each --check-batch size and the max absolute heatmap
difference is printed; above --atol the export is refused (exit 1) and nothing is registered.

With --register the ONNX file is logged as MLflow's ``onnx`` flavour into the run that produced the source
model (registry and runs:/ URIs; a new run in --experiment otherwise) and registered under that name.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from vitpose.pipeline import guarded


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from vitpose.onnx_export import DEFAULT_OPSET

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, a checkpoint folder or weights file")
    p.add_argument("--out", type=Path, help="ONNX file to write (default: named after the model, in the current folder)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--check-batch", type=int, nargs="+", default=[1, 4], metavar="N",
                   help="batch sizes of the parity check (default 1 4; the batch axis is dynamic)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest heatmap difference accepted (default 1e-4)")
    p.add_argument("--register", metavar="NAME", help="log as the mlflow.onnx flavour and register under NAME")
    p.add_argument("--alias", help="with --register: point this alias at the new version")
    p.add_argument("--experiment", default="vitpose-export",
                   help="MLflow experiment when the source model has no run (default vitpose-export)")
    p.add_argument("--tracking-uri", help="MLflow store (default MLFLOW_TRACKING_URI, else runs/mlflow.db)")
    args = p.parse_args(argv)
    if args.alias and not args.register:
        p.error("--alias needs --register NAME")
    if any(b < 1 for b in args.check_batch):
        p.error(f"--check-batch sizes must be >= 1, got {args.check_batch}")
    return args


def default_out(uri: str) -> Path:
    stem = uri.split(":/", 1)[1] if uri.startswith(("models:/", "runs:/")) else Path(uri.rstrip("/")).name
    return Path(re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") + ".onnx")


def source_run(uri: str, tracking_uri: str) -> str | None:
    """The run that logged the model behind a registry or runs:/ URI (None for files and folders)."""
    import mlflow

    if uri.startswith("runs:/"):
        return uri[len("runs:/"):].split("/", 1)[0]
    if not uri.startswith("models:/"):
        return None
    client = mlflow.MlflowClient(tracking_uri)
    ref = uri[len("models:/"):]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return client.get_model_version_by_alias(name, alias).run_id
    name, _, version = ref.partition("/")
    return client.get_model_version(name, version).run_id if version.isdigit() else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return guarded(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    from vitpose import tracking
    from vitpose.model_store import load_vitpose
    from vitpose.onnx_export import check_parity, export_onnx, log_onnx_model, onnx_session

    tracking_uri = tracking.resolve_tracking_uri(args.tracking_uri)
    model, meta = load_vitpose(args.model, tracking_uri)
    out = args.out or default_out(args.model)
    path = export_onnx(model, out, opset=args.opset, meta=meta)
    print(f"exported {args.model} -> {path} ({path.stat().st_size / 1e6:.1f} MB, opset {args.opset}, dynamic batch)")
    parity = check_parity(model, onnx_session(path), tuple(args.check_batch))
    worst = max(p["max_abs_diff"] for p in parity.values())
    for batch, p in parity.items():
        print(f"  batch {batch:>3}: max |onnxruntime - pytorch| heatmap difference {p['max_abs_diff']:.3e} "
              f"(heatmap max {p['max_abs_value']:.3f})")
    if worst > args.atol:
        print(f"error: ONNX output differs from PyTorch by {worst:.3e} > --atol {args.atol}; not registering. "
              f"Try another --opset, or report the model spec {meta['spec']}", file=sys.stderr)
        return 1
    print(f"parity ok: {worst:.3e} <= {args.atol}")
    if args.register:
        tracking.check_tracking_uri(tracking_uri)
        run_id = source_run(args.model, tracking_uri)
        if run_id is None:
            import mlflow

            exp_id = tracking.ensure_experiment(args.experiment, tracking_uri)
            run_id = mlflow.MlflowClient(tracking_uri).create_run(
                exp_id, tags={"mlflow.runName": f"export-{path.stem}", "vitpose.model": args.model}).info.run_id
        version = log_onnx_model(tracking_uri, run_id, path, meta, args.register, args.alias)
        where = f"models:/{args.register}@{args.alias}" if args.alias else f"models:/{args.register}/{version}"
        print(f"registered {where} (version {version}, mlflow.onnx flavour, run {run_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
