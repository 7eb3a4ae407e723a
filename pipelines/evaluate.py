"""Keypoint metrics of a model on a dataset's annotation file, the way training evaluates it.

    python pipelines/evaluate.py --model models:/vitpose-student@champion                 # synthetic val (demo data)
    python pipelines/evaluate.py --model runs/ray/.../checkpoint_000007 --data-root /data/coco \\
        --ann annotations/person_keypoints_val2017.json --images val2017 \\
        --det-file person_detections_AP_H_56.json --mlflow-run-name student-val2017

The file is read in the layout its publisher ships (COCO json, CrowdPose, AIC, AP-10K, COCO-WholeBody,
OneHand10K, MPII's list of people) and scored with the model's own keypoint set; --keypoints names the set of
a file the model was not trained on (a built-in name, or a YAML file describing a custom set the way
data.custom_keypoints does); the model must predict that set's keypoints. Weights stored without their set
take the built-in set the file's names are recognised as, when the counts agree.

--protocol picks the metrics, by default the ones the set's community reports: coco (AP/AR: COCO, AIC,
AP-10K), crowdpose (AP, AP50, AP75, AR.., AP_easy/medium/hard by crowd index), wholebody (body_AP, foot_AP,
face_AP, lefthand_AP, righthand_AP, wholebody_AP, ...), pckh (MPII: PCKh, PCKh_0.1, per joint group), pck
(hands: PCK@0.2 of the box, AUC, EPE in px). pckh and pck score ground-truth boxes only.

Person boxes come from the ground truth, or from a detector's COCO results file (--det-file); the flip test
is on unless --no-flip-test. The crops, decode, rescoring, OKS-NMS and pycocotools COCOeval are the ones the
training loop uses (``vitpose.deploy.inference.PosePredictor.predict_dataset`` + ``vitpose.evaluation``), so the
AP printed here is the AP training reported for the same checkpoint and data.

Prints COCOeval's 10-number summary; writes ``OUT/keypoint_results.json`` (COCO results format, after
rescoring and OKS-NMS) and ``OUT/metrics.json``. With --mlflow-run-name the metrics under their protocol's
names (``eval/AP``, ``eval/AP_hard``, ``eval/PCKh``, ...), the settings and the files go to an MLflow run in
--experiment.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from vitpose.cli import UsageError, guarded
from vitpose.config import DataConfig, resolve_path
from vitpose.evaluation.protocols import DEFAULT_PROTOCOL, HEADLINE, PROTOCOL_METRICS, PROTOCOLS, STAT_NAMES

DEFAULTS = DataConfig()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, a checkpoint folder or weights file")
    p.add_argument("--data-root", default=DEFAULTS.root, help=f"dataset folder (default {DEFAULTS.root})")
    p.add_argument("--ann", default=DEFAULTS.val_ann, help=f"ground-truth json, relative to --data-root (default {DEFAULTS.val_ann})")
    p.add_argument("--images", default=DEFAULTS.val_images, help=f"image folder, relative to --data-root (default {DEFAULTS.val_images})")
    p.add_argument("--det-file", help="person detections (COCO results json) to take boxes from instead of the ground "
                                      "truth; a relative path is looked up in the current folder, then in --data-root")
    p.add_argument("--det-score-thr", type=float, default=0.0, help="keep detections scored at least this (default 0)")
    p.add_argument("--keypoints", metavar="SET", help="keypoint set to read and score --ann with: a built-in name "
                   "(python -m vitpose.data.keypoints --list) or a YAML file of a custom set (names, sigmas, flip_pairs, "
                   "skeleton); default the model's own")
    p.add_argument("--protocol", choices=PROTOCOLS, help="metrics to report (default: the keypoint set's: "
                   + ", ".join(f"{k} {v}" for k, v in DEFAULT_PROTOCOL.items()) + ", others coco)")
    p.add_argument("--no-flip-test", action="store_true", help="evaluate without the flip test")
    p.add_argument("--batch-size", type=int, default=32, help="crops per forward pass (default 32)")
    p.add_argument("--workers", type=int, default=0, help="data loader processes (default 0: in this process)")
    p.add_argument("--device", help="torch device, e.g. cuda:0 (default: cuda when available, else cpu)")
    p.add_argument("--out", type=Path, help="output folder (default runs/eval/<time>)")
    p.add_argument("--mlflow-run-name", help="also log settings, metrics and files to an MLflow run of this name")
    p.add_argument("--experiment", default="vitpose-eval", help="MLflow experiment for --mlflow-run-name (default vitpose-eval)")
    p.add_argument("--tracking-uri", help="MLflow store (default MLFLOW_TRACKING_URI, else runs/mlflow.db)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    return args


def resolve_inputs(args: argparse.Namespace) -> tuple[Path, Path, Path | None]:
    """The annotation file, image folder and detection file, each checked to exist."""
    root = resolve_path(args.data_root) if not Path(args.data_root).is_dir() else Path(args.data_root)
    if not root.is_dir():
        raise UsageError(f"--data-root {args.data_root}: no such folder; give the dataset folder (the one with "
                         "annotations/ and the images)")
    ann, images = root / args.ann, root / args.images
    if not ann.is_file():
        raise UsageError(f"--ann {args.ann}: {ann} does not exist; give the ground-truth json relative to --data-root "
                         "(COCO: annotations/person_keypoints_val2017.json)")
    if not images.is_dir():
        raise UsageError(f"--images {args.images}: {images} is not a folder; give the image folder relative to "
                         "--data-root (COCO: val2017)")
    det = None
    if args.det_file:
        tried = list(dict.fromkeys([Path(args.det_file), root / args.det_file]))  # one entry when absolute
        det = next((t for t in tried if t.is_file()), None)
        if det is None:
            raise UsageError(f"--det-file {args.det_file}: not found (tried {', '.join(map(str, tried))})")
    return ann, images, det


def keypoint_set(args: argparse.Namespace, predictor: Any) -> Any:
    """--keypoints, else the model's own set (None for weights stored without one: the file's names decide)."""
    import yaml

    from vitpose.data.keypoints import custom_keypoint_set, get_keypoint_set
    from vitpose.data.keypoints.set import FROM_FILE

    if not args.keypoints:
        # Weights stored without a set carry a guessed one (COCO for 17): the file's names decide instead.
        assumed = predictor.keypoint_set.name == FROM_FILE or predictor.meta.get("keypoints_assumed")
        return None if assumed else predictor.keypoint_set
    try:
        if Path(args.keypoints).suffix in (".yaml", ".yml"):
            if not Path(args.keypoints).is_file():
                raise ValueError(f"{args.keypoints} does not exist")
            spec = yaml.safe_load(Path(args.keypoints).read_text()) or {}
            spec = spec.get("data", {}).get("custom_keypoints", spec)  # a whole config, or the set alone
            return custom_keypoint_set(spec)
        return get_keypoint_set(args.keypoints)
    except (ValueError, KeyError, TypeError, yaml.YAMLError) as err:
        raise UsageError(f"--keypoints {args.keypoints}: {err}; give a built-in set name or a YAML file with names "
                         "and sigmas (and flip_pairs, skeleton as name pairs)") from None


def evaluate(args: argparse.Namespace) -> tuple[dict[str, float], str, Path, dict[str, Any]]:
    """Run the evaluation; returns (metrics, COCOeval summary text, output folder, settings)."""
    from vitpose.data.coco import TopDownCocoDataset
    from vitpose.data.keypoints import BUILTIN_SETS
    from vitpose.deploy.inference import PosePredictor, resolve_device
    from vitpose.evaluation import CocoKeypointEvaluator

    ann, images, det = resolve_inputs(args)
    predictor = PosePredictor.from_uri(args.model, args.tracking_uri, flip_test=not args.no_flip_test,
                                       batch_size=args.batch_size, device=resolve_device(args.device))
    kset = keypoint_set(args, predictor)
    if kset is not None and predictor.meta.get("keypoints_assumed") and kset.num_keypoints == predictor.num_keypoints:
        # Weights stored without their keypoint set (an official .pth, a bare .safetensors): --keypoints says it.
        predictor = PosePredictor(predictor.model, {**predictor.meta, "keypoints": kset.to_info()},
                                  flip_test=not args.no_flip_test, batch_size=args.batch_size, device=predictor.device)
    try:
        dataset = TopDownCocoDataset(ann, images, train=False, input_size=predictor.input_size, det_file=det,
                                     det_score_thr=args.det_score_thr, keypoints=kset)
        found = dataset.keypoint_set
        if kset is None and predictor.meta.get("keypoints_assumed") and found.name in BUILTIN_SETS \
                and found.num_keypoints == predictor.num_keypoints:
            # Weights without their set, a file recognised as a built-in set of the same count: that set.
            predictor = PosePredictor(predictor.model, {**predictor.meta, "keypoints": found.to_info()},
                                      flip_test=not args.no_flip_test, batch_size=args.batch_size,
                                      device=predictor.device)
        evaluator = CocoKeypointEvaluator(ann, keypoints=found, protocol=args.protocol)
    except ValueError as err:  # no usable instances, a malformed file, another keypoint set: it names the file
        hint = "" if args.keypoints else "; if the file holds another keypoint set, name it with --keypoints"
        raise UsageError(f"{err}{hint}") from None
    out = args.out or resolve_path("runs/eval") / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        predictions = predictor.predict_dataset(dataset, num_workers=args.workers)
    except ValueError as err:  # model and dataset disagree (keypoint set)
        hint = "" if args.keypoints else "; if the model was stored without its set, name it with --keypoints"
        raise UsageError(f"{err}{hint}") from None
    seconds = time.perf_counter() - t0
    try:
        metrics = evaluator.evaluate(predictions, results_file=out / "keypoint_results.json")
    except ValueError as err:  # a protocol the file or the boxes cannot give (crowdIndex, detections for PCK)
        raise UsageError(str(err)) from None
    settings = {
        "model": args.model, "ann": str(ann), "images": str(images), "det_file": str(det) if det else None,
        "det_score_thr": args.det_score_thr, "flip_test": predictor.flip_test, "instances": len(dataset),
        "keypoints": dataset.keypoint_set.name, "protocol": evaluator.protocol,
        "img_size": list(predictor.input_size), "batch_size": args.batch_size,
        "crops_per_second": round(len(dataset) / max(seconds, 1e-9), 2),
    }
    # COCOeval's 10 stat lines and the protocol's, without pycocotools' progress chatter.
    protocol_lines = {f" {n:<16} =" for n in PROTOCOL_METRICS[evaluator.protocol] if n not in STAT_NAMES}
    summary = "\n".join(line for line in evaluator.summary.splitlines()
                        if line.lstrip().startswith("Average") or line[:19] in protocol_lines
                        or line.endswith(" protocol:"))
    summary = summary or evaluator.summary.strip()
    (out / "metrics.json").write_text(json.dumps({"metrics": metrics, "settings": settings}, indent=1))
    (out / "summary.txt").write_text(summary + "\n")
    return metrics, summary, out, settings


def log_to_mlflow(args: argparse.Namespace, metrics: dict[str, float], out: Path, settings: dict[str, Any]) -> str:
    from vitpose.run import tracking

    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    tracking.check_tracking_uri(uri)
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp_id = tracking.ensure_experiment(args.experiment, uri)
    run_id = client.create_run(exp_id, tags={"mlflow.runName": args.mlflow_run_name, "vitpose.model": args.model}).info.run_id
    client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in settings.items()])
    tracking.log_metrics(uri, run_id, {f"eval/{k}": v for k, v in metrics.items()})
    for name in ("keypoint_results.json", "metrics.json", "summary.txt"):
        tracking.log_artifact(uri, run_id, out / name)
    tracking.end_run(uri, run_id, "FINISHED")
    return run_id


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return guarded(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    metrics, summary, out, settings = evaluate(args)
    run_id = log_to_mlflow(args, metrics, out, settings) if args.mlflow_run_name else None
    boxes = f"detections {settings['det_file']}" if settings["det_file"] else "ground-truth boxes"
    print(f"{args.model} on {settings['ann']} ({settings['instances']} instances, {boxes}, "
          f"flip test {'on' if settings['flip_test'] else 'off'}, {settings['crops_per_second']} crops/s)")
    print(summary.rstrip())
    protocol = settings["protocol"]
    shown = [HEADLINE[protocol], *(k for k in ("AP", "AP50", "AR") if k != HEADLINE[protocol])]
    print(f"{protocol}: " + "  ".join(f"{k} {metrics[k]:.4f}" for k in shown))
    print(f"results: {out / 'keypoint_results.json'}  metrics: {out / 'metrics.json'}")
    if run_id:
        print(f"MLflow run {run_id} ({args.mlflow_run_name}) in experiment {args.experiment}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
