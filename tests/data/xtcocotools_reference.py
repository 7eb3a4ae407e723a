"""The reference numbers in tests/test_publisher_files.py: xtcocotools' own COCOeval on our test files.

xtcocotools 1.14.3 (the CrowdPose / COCO-WholeBody evaluator mmpose uses) does not import with numpy 2: its
compiled mask module is built against numpy 1's ABI and its cocoeval uses ``np.float``. Its cocoeval.py and
coco.py are pure Python, so this runs them with pycocotools' mask module standing in (only segmentation and
box IoU use it) and ``np.float = float``, on the predictions the test makes, and prints both sets of numbers.

    pip download xtcocotools==1.14.3 --no-deps -d /tmp/xtc && pip install --no-deps --target /tmp/xtc_t /tmp/xtc/*.whl
    .venv/bin/python tests/data/xtcocotools_reference.py
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import types

import numpy as np
import pycocotools.mask

sys.path.insert(0, ".")
from tests.test_publisher_files import noisy_predictions  # noqa: E402
from vitpose.evaluation import CocoKeypointEvaluator  # noqa: E402

np.float = float  # type: ignore[attr-defined]  # removed in numpy 1.24; xtcocotools still uses it
_pkg = types.ModuleType("xtcocotools")
_pkg.__path__ = ["/tmp/xtc_t/xtcocotools"]
sys.modules["xtcocotools"], sys.modules["xtcocotools.mask"] = _pkg, pycocotools.mask
from xtcocotools.coco import COCO as XCOCO  # noqa: E402
from xtcocotools.cocoeval import COCOeval as XEval  # noqa: E402

PARTS = ("body", "foot", "face", "lefthand", "righthand", "wholebody")
FIELDS = ("keypoints", "foot_kpts", "face_kpts", "lefthand_kpts", "righthand_kpts")


def xt_eval(ann, results, iou_type: str, sigmas, use_area: bool) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = XCOCO(str(ann))
        x = XEval(gt, gt.loadRes(json.loads(json.dumps(results))), iou_type, np.asarray(sigmas), use_area=use_area)
        x.evaluate()
        x.accumulate()
        x.summarize()
    return x.stats


def main() -> None:
    ds, preds = noisy_predictions("crowdpose")
    ev = CocoKeypointEvaluator(ds.ann_file)
    ours = ev.evaluate(preds)
    stats = xt_eval(ds.ann_file, ev.rescore_and_nms(preds), "keypoints_crowd", ds.keypoint_set.sigmas, False)
    names = ("AP", "AP50", "AP75", "AR", "AR50", "AR75", "AP_easy", "AP_medium", "AP_hard")
    print("crowdpose xtcocotools:", {n: round(float(v), 6) for n, v in zip(names, stats, strict=True)})
    print("crowdpose ours:       ", {n: round(ours[n], 6) for n in names})

    ds, preds = noisy_predictions("coco_wholebody")
    ev = CocoKeypointEvaluator(ds.ann_file)
    ours = ev.evaluate(preds)
    cuts = np.cumsum([0] + [n for _, n in ds.keypoint_set.parts])
    results = [{**r, **{f: r["keypoints"][3 * cuts[i]:3 * cuts[i + 1]] for i, f in enumerate(FIELDS)}}
               for r in ev.rescore_and_nms(preds)]
    sigmas = np.asarray(ds.keypoint_set.sigmas)
    for i, part in enumerate(PARTS):
        s = sigmas if part == "wholebody" else sigmas[cuts[i]:cuts[i + 1]]
        stats = xt_eval(ds.ann_file, results, f"keypoints_{part}", s, True)
        print(f"{part:10s} xtcocotools AP {stats[0]:.6f} AR {stats[5]:.6f} | "
              f"ours AP {ours[part + '_AP']:.6f} AR {ours[part + '_AR']:.6f}")


if __name__ == "__main__":
    main()
