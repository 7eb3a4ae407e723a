"""Evaluator: OKS-NMS against a transcription of mmpose's, rescoring, COCOeval wiring (perfect, degraded and
empty predictions), sigmas, image subsets and the batch decoding helper."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import MINI_ANN as ANN
from vitpose.data.codec import encode
from vitpose.evaluation import (
    COCO_SIGMAS,
    STAT_NAMES,
    CocoKeypointEvaluator,
    decode_batch_to_predictions,
    oks_nms,
)


def mmpose_oks_nms(kpts_db, thr, sigmas):
    """mmpose 0.x mmpose/core/post_processing/nms.py::oks_nms (+ oks_iou), transcribed."""

    def oks_iou(g, d, a_g, a_d):
        vars_ = (sigmas * 2) ** 2
        xg, yg = g[0::3], g[1::3]
        ious = np.zeros(len(d))
        for n_d in range(len(d)):
            xd, yd = d[n_d, 0::3], d[n_d, 1::3]
            e = ((xd - xg) ** 2 + (yd - yg) ** 2) / vars_ / ((a_g + a_d[n_d]) / 2 + np.spacing(1)) / 2
            ious[n_d] = np.sum(np.exp(-e)) / len(e)
        return ious

    scores = np.array([k["score"] for k in kpts_db])
    kpts = np.array([k["keypoints"].flatten() for k in kpts_db])
    areas = np.array([k["area"] for k in kpts_db])
    order = scores.argsort()[::-1]
    keep = []
    while len(order) > 0:
        i = order[0]
        keep.append(i)
        ovr = oks_iou(kpts[i], kpts[order[1:]], areas[i], areas[order[1:]])
        order = order[np.where(ovr <= thr)[0] + 1]
    return keep


def test_oks_nms_matches_mmpose():
    rng = np.random.default_rng(0)
    for trial in range(20):
        base = rng.uniform(0, 200, (4, 17, 3))
        # Clusters of near-duplicates around a few people, like overlapping detector boxes give.
        kps = np.concatenate([base[rng.integers(4, size=12)] + rng.normal(0, 3 + trial, (12, 17, 3))])
        scores = rng.random(12)
        areas = rng.uniform(2000, 8000, 12)
        db = [{"keypoints": kps[i], "score": scores[i], "area": areas[i]} for i in range(12)]
        assert oks_nms(kps, scores, areas, 0.9, COCO_SIGMAS) == [
            int(i) for i in mmpose_oks_nms(db, 0.9, COCO_SIGMAS)
        ]


def _gt_as_predictions(ann_file: Path, noise: float = 0.0, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    data = json.loads(ann_file.read_text())
    preds = []
    for a in data["annotations"]:
        if a["num_keypoints"] == 0:
            continue
        kps = np.asarray(a["keypoints"], dtype=np.float64).reshape(-1, 3)
        kps[:, :2] += rng.normal(0, noise, (len(kps), 2))
        kps[:, 2] = 0.9
        preds.append({"image_id": a["image_id"], "keypoints": kps, "bbox_score": 1.0, "area": a["area"]})
    return preds


def test_perfect_noisy_and_empty_predictions(tmp_path):
    ev = CocoKeypointEvaluator(ANN)
    stats = ev.evaluate(_gt_as_predictions(ANN), results_file=tmp_path / "out" / "results.json")
    assert set(stats) == set(STAT_NAMES)
    assert stats["AP"] == pytest.approx(1.0) and stats["AR"] == pytest.approx(1.0)
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in ev.summary
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(written) == 12 and set(written[0]) == {"image_id", "category_id", "keypoints", "score"}
    noisy = ev.evaluate(_gt_as_predictions(ANN, noise=8.0))
    print(f"\nGT as predictions: AP {stats['AP']:.3f}; with 8 px noise: AP {noisy['AP']:.3f}")
    assert 0.0 < noisy["AP"] < 0.95
    assert ev.evaluate([]) == dict.fromkeys(STAT_NAMES, 0.0)
    stray = dict(_gt_as_predictions(ANN)[0], image_id=123456789)
    with pytest.raises(ValueError, match="123456789"):
        ev.evaluate([stray])


def test_rescoring_and_duplicate_suppression():
    ev = CocoKeypointEvaluator(ANN)
    preds = _gt_as_predictions(ANN)
    preds[0]["keypoints"][:, 2] = [0.1] * 5 + [0.6] * 12  # joints under 0.2 do not count in the mean
    preds[0]["bbox_score"] = 0.5
    dup = dict(preds[0], keypoints=preds[0]["keypoints"] + [0.5, 0.5, 0.0], bbox_score=0.4)
    results = ev.rescore_and_nms([*preds, dup])
    assert len(results) == len(preds)  # the near-duplicate went
    first = next(
        r for r in results if r["keypoints"][:2] == [round(float(v), 3) for v in preds[0]["keypoints"][0, :2]]
    )
    assert first["score"] == pytest.approx(0.5 * 0.6)
    no_nms = CocoKeypointEvaluator(ANN, oks_nms_thr=None)
    assert len(no_nms.rescore_and_nms([*preds, dup])) == len(preds) + 1


def test_image_subset():
    ev = CocoKeypointEvaluator(ANN)
    preds = [p for p in _gt_as_predictions(ANN) if p["image_id"] == 785]
    assert ev.evaluate(preds)["AR"] < 0.2  # other images' people count as missed
    assert ev.evaluate(preds, image_ids=[785])["AP"] == pytest.approx(1.0)


def test_sigmas_from_file_and_errors(tmp_path):
    cat = {"id": 1, "name": "thing", "keypoints": ["a", "b", "c"], "skeleton": []}
    data = {
        "images": [{"id": 1, "width": 10, "height": 10, "file_name": "x.jpg"}],
        "annotations": [],
        "categories": [cat],
    }
    (tmp_path / "a.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="3 keypoints"):
        CocoKeypointEvaluator(tmp_path / "a.json")
    assert CocoKeypointEvaluator(tmp_path / "a.json", sigmas=[0.1, 0.2, 0.3]).sigmas.tolist() == [
        0.1,
        0.2,
        0.3,
    ]
    cat["sigmas"] = [0.05, 0.05, 0.05]
    (tmp_path / "b.json").write_text(json.dumps(data))
    assert CocoKeypointEvaluator(tmp_path / "b.json").sigmas.tolist() == [0.05] * 3
    with pytest.raises(FileNotFoundError, match="missing.json"):
        CocoKeypointEvaluator(tmp_path / "missing.json")


def test_decode_batch_to_predictions_from_collated_torch_batch():
    rng = np.random.default_rng(0)
    kps_input = rng.uniform(30, 160, (2, 17, 2))
    heatmaps, _ = encode(kps_input, np.ones((2, 17)), (256, 192), (64, 48))
    metas = {
        "center": torch.tensor([[100.0, 120.0], [300.0, 200.0]]),
        "scale": torch.tensor([[96.0, 128.0], [192.0, 256.0]]),
        "image_id": torch.tensor([5, 6]),
        "bbox_score": torch.tensor([0.9, 0.8]),
        "ann_id": torch.tensor([11, -1]),
    }
    preds = decode_batch_to_predictions(torch.from_numpy(heatmaps), metas, input_size=(256, 192))
    assert [p["image_id"] for p in preds] == [5, 6] and [p["ann_id"] for p in preds] == [11, -1]
    assert preds[0]["keypoints"].shape == (17, 3)
    # Input pixel -> image: x_img = x_in * scale_w / 191 + centre - scale_w / 2.
    expected = kps_input[0] * np.array([96 / 191, 128 / 255]) + np.array([100 - 48, 120 - 64])
    np.testing.assert_allclose(preds[0]["keypoints"][:, :2], expected, atol=1e-2)
    assert preds[1]["area"] == pytest.approx(192 * 256)
    with pytest.raises(ValueError, match="flip_pairs"):
        decode_batch_to_predictions(heatmaps, metas, heatmaps, input_size=(256, 192))
