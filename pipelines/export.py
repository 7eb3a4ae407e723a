"""Export a model to ONNX (dynamic batch), check it against PyTorch in onnxruntime, optionally register it.

    python pipelines/export.py --model models:/vitpose-student@champion --out student.onnx
    python pipelines/export.py --model models:/vitpose-student@champion --register vitpose-student-onnx --alias champion

The exported graph is the network only: normalised crops ``images`` (N, 3, H, W) → ``heatmaps``
(N, K, H/4, W/4); the spec and keypoint metadata ride in the file's metadata_props. Parity: the same
seeded crops go through PyTorch and onnxruntime at each --check-batch size and the max absolute heatmap
difference is printed; above --atol the export is refused (exit 1) and nothing is registered.

With --register the ONNX file is logged as MLflow's ``onnx`` flavour into the run that produced the source
model (registry and runs:/ URIs; a new run in --experiment otherwise) and registered under that name.

    python pipelines/export.py --model models:/vitpose-student@champion --int8 --register vitpose-student-int8

--int8 also writes OUT.int8.onnx: static int8 quantization calibrated on --calib-crops crops of the model's
own training data (the config.yaml of the run that logged the model, or --config), then prints the int8 vs
fp32 heatmap difference and the val AP of eager, fp32 and int8 (flip test on); an AP drop above
--max-ap-drop points refuses it (exit 1). With --register the int8 file is registered as the pose pyfunc
(images and boxes in, keypoints out, like any registered vitpose model) whose network runs in onnxruntime:
``mlflow models serve -m models:/vitpose-student-int8/1 --env-manager local`` serves it.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from vitpose.cli import UsageError, guarded
from vitpose.deploy.detector import FORMATS as DETECTOR_FORMATS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from vitpose.deploy.onnx import DEFAULT_OPSET

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
    p.add_argument("--int8", action="store_true", help="also write and check an int8 file (see above); with "
                   "--register, register it as the pose pyfunc instead of the fp32 onnx flavour")
    p.add_argument("--config", type=Path, help="with --int8: the training config whose data calibrates (default: "
                   "config.yaml of the run that logged the model)")
    p.add_argument("--calib-crops", type=int, default=64, help="with --int8: training crops to calibrate on (default 64)")
    p.add_argument("--max-ap-drop", type=float, default=0.5,
                   help="with --int8: largest val AP drop from eager accepted, in AP points (default 0.5)")
    p.add_argument("--detector", help="with --register: an ONNX person detector (a file or an MLflow model URI such as "
                   "models:/vitpose-detector@current) registered with the pose pyfunc, so the served model answers "
                   "images without boxes (vitpose.deploy.detector)")
    p.add_argument("--detector-format", default="auto", choices=DETECTOR_FORMATS,
                   help="with --detector: the file's layout")
    p.add_argument("--detector-score-thr", type=float, help="with --detector: person boxes below this are dropped "
                   "(default: the threshold the file recommends, else 0.3)")
    p.add_argument("--experiment", default="vitpose-export",
                   help="MLflow experiment when the source model has no run (default vitpose-export)")
    p.add_argument("--tracking-uri", help="MLflow store (default MLFLOW_TRACKING_URI, else runs/mlflow.db)")
    args = p.parse_args(argv)
    if args.alias and not args.register:
        p.error("--alias needs --register NAME")
    if args.detector and not args.register:
        p.error("--detector needs --register NAME: it is registered with the pose model")
    if (args.config or args.calib_crops != 64) and not args.int8:
        p.error("--config and --calib-crops go with --int8")
    if args.calib_crops < 1:
        p.error(f"--calib-crops must be >= 1, got {args.calib_crops}")
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
    from vitpose.deploy.onnx import check_parity, export_onnx, log_onnx_model, onnx_session
    from vitpose.models import create
    from vitpose.run import tracking

    tracking_uri = tracking.resolve_tracking_uri(args.tracking_uri)
    if args.detector:
        check_detector(args)
    model = create(args.model, tracking_uri=tracking_uri)
    meta = model.meta
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
    int8 = None
    if args.int8:
        int8 = export_int8(args, model, meta, path, tracking_uri)
        if int8 is None:
            return 1
    if args.register:
        tracking.check_tracking_uri(tracking_uri)
        run_id = source_run(args.model, tracking_uri)
        if run_id is None:
            import mlflow

            exp_id = tracking.ensure_experiment(args.experiment, tracking_uri)
            run_id = mlflow.MlflowClient(tracking_uri).create_run(
                exp_id, tags={"mlflow.runName": f"export-{path.stem}", "vitpose.model": args.model}).info.run_id
        if int8 is not None or args.detector:
            version, kind = register_pyfunc(tracking_uri, run_id, model, meta, int8, args), "pose pyfunc" + (
                ", int8 ONNX network" if int8 else "") + (f", {args.detector_format} detector" if args.detector else "")
        else:
            version, kind = log_onnx_model(tracking_uri, run_id, path, meta, args.register, args.alias), "mlflow.onnx flavour"
        where = f"models:/{args.register}@{args.alias}" if args.alias else f"models:/{args.register}/{version}"
        print(f"registered {where} (version {version}, {kind}, run {run_id})")
    return 0


def export_int8(args: argparse.Namespace, model: Any, meta: dict[str, Any], fp32_path: Path,
                tracking_uri: str) -> tuple[Path, dict[str, float]] | None:
    """Calibrate, quantize and check; the int8 file and its report, or None when the AP drop is too large."""
    from vitpose.build import build_datasets
    from vitpose.deploy.int8 import calibration_crops, int8_report, quantize_int8

    cfg, where = training_config(args, tracking_uri)
    train, val = build_datasets(cfg, is_local_leader=True)
    if tuple(train.input_size) != tuple(model.spec.img_size):
        raise UsageError(f"{where} makes {list(train.input_size)} crops but {args.model} takes "
                         f"{list(model.spec.img_size)}; give the config the model was trained with (--config)")
    out = fp32_path.with_name(fp32_path.stem + ".int8.onnx")
    crops = calibration_crops(train, args.calib_crops)
    quantize_int8(fp32_path, out, crops)
    print(f"int8 -> {out} ({out.stat().st_size / 1e6:.1f} MB, static QDQ, calibrated on {len(crops)} training crops "
          f"of {where})")
    r = int8_report(model, meta, fp32_path, out, val)
    drop = 100 * (r["ap_eager"] - r["ap_int8"])
    print(f"  val crops: max |fp32 onnxruntime - pytorch| heatmap difference {r['fp32_vs_eager_max_abs_diff']:.3e}, "
          f"max |int8 - fp32| {r['int8_vs_fp32_max_abs_diff']:.3e} (heatmap max {r['heatmap_max']:.3f})")
    print(f"  val AP ({len(val)} instances, flip test): eager {r['ap_eager']:.4f}, fp32 onnxruntime {r['ap_fp32']:.4f}, "
          f"int8 {r['ap_int8']:.4f} (drop {drop:+.2f} points)")
    if drop > args.max_ap_drop:
        print(f"error: int8 loses {drop:.2f} AP points > --max-ap-drop {args.max_ap_drop}; not registering. Try "
              "more --calib-crops, or serve the fp32 export", file=sys.stderr)
        return None
    print(f"int8 ok: AP drop {drop:.2f} <= {args.max_ap_drop} points")
    return out, r


def training_config(args: argparse.Namespace, tracking_uri: str) -> tuple[Any, str]:
    """--config, else the config.yaml logged with the run that made the model; and where it came from."""
    import tempfile

    import yaml

    from vitpose.config import StudentConfig, TeacherConfig, load_config

    path, where = args.config, str(args.config)
    if path is None:
        run_id = source_run(args.model, tracking_uri)
        if run_id is None:
            raise UsageError(f"--int8 calibrates on the model's training data, and {args.model} is not a registered "
                             "or run model with its config; give the training config with --config")
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            path = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config.yaml",
                                                            dst_path=tempfile.mkdtemp(), tracking_uri=tracking_uri))
        except (MlflowException, OSError):
            raise UsageError(f"run {run_id} of {args.model} has no config.yaml to calibrate with; give the training "
                             "config with --config") from None
        where = f"the config of run {run_id}"
    if not Path(path).is_file():
        raise UsageError(f"--config {path}: no such file; give the YAML config the model was trained with")
    raw = yaml.safe_load(Path(path).read_text()) or {}
    schema = StudentConfig if "distill" in raw else TeacherConfig  # a sweep's config has its distill section
    return load_config(path, schema=schema), where


def register_pyfunc(tracking_uri: str, run_id: str, model: Any, meta: dict[str, Any],
                    int8: tuple[Path, dict[str, float]] | None, args: argparse.Namespace) -> str | None:
    """The pose pyfunc (see vitpose.deploy.serving.log_vitpose_model) with the int8 file as its network and the
    --detector, when given."""
    import tempfile

    from vitpose.deploy.serving import log_vitpose_model
    from vitpose.models import save_safetensors

    extra: dict[str, Any] = {}
    if int8 is not None:
        extra["network"] = {"runtime": "onnxruntime", "precision": "int8", "source": args.model,
                            **{k: round(v, 6) for k, v in int8[1].items()}}
    if args.detector:
        extra["detector"] = {"format": args.detector_format, "score_thr": args.detector_score_thr,
                             "file": args.detector.name}
    with tempfile.TemporaryDirectory() as tmp:
        weights = save_safetensors(model, Path(tmp) / "model.safetensors")
        return log_vitpose_model(tracking_uri, run_id, Path(weights), {**meta, **extra}, args.register,
                                 args.alias, network=int8[0] if int8 else None, detector=args.detector)


def check_detector(args: argparse.Namespace) -> None:
    """Open --detector before any export work: a file that is no known detector is a usage error."""
    from vitpose.deploy.detector import DetectorFormatError, OnnxPersonDetector, detector_file

    try:
        args.detector = detector_file(args.detector, args.tracking_uri)  # a models:/ URI: the file downloaded
        found = OnnxPersonDetector(args.detector, args.detector_format, score_thr=args.detector_score_thr)
        args.detector_format, args.detector_score_thr = found.format, found.score_thr
    except (DetectorFormatError, FileNotFoundError) as err:
        raise UsageError(f"--detector {err}") from None


if __name__ == "__main__":
    sys.exit(main())
