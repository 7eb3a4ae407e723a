"""Synthetic dataset: determinism, COCO format, visibility flags, left/right cues, loading through the real
dataset and evaluator, the ensure-helper's caching, and the generation speed (printed)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image

from vitpose.data.coco import TopDownCocoDataset
from vitpose.data.keypoints import COCO_KEYPOINTS
from vitpose.data.synthetic import (
    MARKER,
    SynthConfig,
    ensure_synthetic_dataset,
    generate_dataset,
    generate_split,
    main,
)
from vitpose.evaluation import CocoKeypointEvaluator

COCO_PAIRS = [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return generate_dataset(root, train_instances=300, val_instances=60, seed=3)


def _load(path):
    return json.loads(path.read_text())


def test_same_seed_same_bytes_other_seed_differs(tmp_path, small):
    again = generate_dataset(tmp_path / "again", train_instances=300, val_instances=60, seed=3)
    assert again.train_ann.read_bytes() == small.train_ann.read_bytes()
    assert again.val_ann.read_bytes() == small.val_ann.read_bytes()
    for name in ("00000001.jpg", "00000017.jpg"):
        assert (again.train_images / name).read_bytes() == (small.train_images / name).read_bytes()
    other = generate_split(tmp_path / "other", "train", 300, 4, SynthConfig())
    assert other.read_bytes() != small.train_ann.read_bytes()


def test_coco_format_counts_and_categories(small):
    data = _load(small.train_ann)
    cat = data["categories"][0]
    assert cat["keypoints"] == COCO_KEYPOINTS and len(cat["skeleton"]) == 19
    anns = data["annotations"]
    assert sum(a["num_keypoints"] > 0 for a in anns) == 300
    assert len({a["id"] for a in anns}) == len(anns)
    assert sum(a["num_keypoints"] > 0 for a in _load(small.val_ann)["annotations"]) == 60
    files = {im["file_name"] for im in data["images"]}
    assert files == {p.name for p in small.train_images.iterdir()}
    with Image.open(small.train_images / "00000001.jpg") as im:
        assert im.size == (256, 256) and im.mode == "RGB"


def test_visibility_flags_consistent_with_image_bounds(small):
    data = _load(small.train_ann)
    size = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    counts = np.zeros(3, int)
    for a in data["annotations"]:
        w, h = size[a["image_id"]]
        kps = np.asarray(a["keypoints"], dtype=float).reshape(17, 3)
        labelled = kps[:, 2] > 0
        assert set(np.unique(kps[:, 2])) <= {0, 1, 2}
        assert a["num_keypoints"] == labelled.sum() and a["iscrowd"] == 0
        assert ((kps[labelled, 0] >= 0) & (kps[labelled, 0] <= w - 1)).all()
        assert ((kps[labelled, 1] >= 0) & (kps[labelled, 1] <= h - 1)).all()
        assert (kps[~labelled, :2] == 0).all()
        x, y, bw, bh = a["bbox"]
        assert x >= 0 and y >= 0 and x + bw <= w and y + bh <= h and 0 < a["area"] <= bw * bh
        counts += np.bincount(kps[:, 2].astype(int), minlength=3)
    frac = counts / counts.sum()
    print(f"\nvisibility 0/1/2 fractions: {frac.round(3)}")
    assert frac[1] > 0.02 and frac[0] > 0.02 and frac[2] > 0.6  # occlusion and truncation both happen


def test_left_and_right_limbs_have_distinct_colour_families(small):
    data = _load(small.train_ann)
    images = {}
    warm = {"left": [], "right": []}
    for a in data["annotations"]:
        if a["image_id"] not in images:
            with Image.open(small.train_images / f"{a['image_id']:08d}.jpg") as im:
                images[a["image_id"]] = np.asarray(im.convert("RGB"), dtype=int)
        img = images[a["image_id"]]
        kps = np.asarray(a["keypoints"], dtype=float).reshape(17, 3)
        for side, joints in (("left", (9, 15)), ("right", (10, 16))):  # wrists, ankles
            for j in joints:
                if kps[j, 2] == 2:
                    r, _, b = img[int(round(kps[j, 1])), int(round(kps[j, 0]))]
                    warm[side].append(r > b)
    left, right = np.mean(warm["left"]), np.mean(warm["right"])
    print(f"\nwarm (R > B) at visible left extremities {left:.2f}, right {right:.2f}")
    assert left > 0.8 and right < 0.2


def test_loads_through_dataset_and_evaluator(small):
    ds = TopDownCocoDataset(small.train_ann, small.train_images, train=True, aug_seed=0)
    assert ds.flip_pairs == COCO_PAIRS and len(ds) == 300
    item = ds[5]
    assert item["image"].shape == (3, 256, 192) and float(item["target_weight"].sum()) > 0
    val = TopDownCocoDataset(small.val_ann, small.val_images, train=False)
    assert len(val) == 60
    preds = []
    for a in _load(small.val_ann)["annotations"]:
        kps = np.asarray(a["keypoints"], dtype=float).reshape(17, 3)
        kps[:, 2] = 1.0
        preds.append({"image_id": a["image_id"], "keypoints": kps, "bbox_score": 1.0, "area": a["area"]})
    assert CocoKeypointEvaluator(small.val_ann).evaluate(preds)["AP"] == pytest.approx(1.0)


def test_ensure_generates_once_and_regenerates_on_change(tmp_path):
    root = tmp_path / "synthetic"
    paths = ensure_synthetic_dataset(root, train_instances=20, val_instances=10, seed=0)
    stamp = paths.train_ann.stat().st_mtime_ns
    assert json.loads((root / MARKER).read_text())["train_instances"] == 20
    again = ensure_synthetic_dataset(root, train_instances=20, val_instances=10, seed=0)
    assert again == paths and again.train_ann.stat().st_mtime_ns == stamp
    cfg = SynthConfig(clutter=0.1)
    changed = ensure_synthetic_dataset(root, train_instances=20, val_instances=10, seed=0, cfg=cfg)
    assert json.loads((root / MARKER).read_text())["config"]["clutter"] == 0.1
    assert sum(a["num_keypoints"] > 0 for a in _load(changed.train_ann)["annotations"]) == 20
    assert [p.name for p in tmp_path.iterdir()] == ["synthetic"]  # no temporary folders left behind
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="foreign"):
        ensure_synthetic_dataset(foreign, train_instances=20, val_instances=10)
    assert (foreign / "keep.txt").read_text() == "mine"


def test_cli(tmp_path, capsys):
    main(
        [
            "--out",
            str(tmp_path / "cli"),
            "--train-instances",
            "12",
            "--val-instances",
            "5",
            "--seed",
            "1",
            "--image-size",
            "192",
            "--clutter",
            "0.2",
        ]
    )
    assert "12 train + 5 val" in capsys.readouterr().out
    data = _load(tmp_path / "cli" / "annotations" / "person_keypoints_train.json")
    assert data["images"][0]["width"] == 192
    with pytest.raises(ValueError, match="clutter"):
        SynthConfig(clutter=2.0)


def test_the_default_training_split_has_what_it_promises(tmp_path):
    """The demo's 2000-instance split: that many annotated people on 1-2 per image, every image on disk and
    referenced (the generation speed is printed for the record; tests do not time)."""
    t0 = time.perf_counter()
    ann = generate_split(tmp_path, "train", 2000, 0, SynthConfig())
    dt = time.perf_counter() - t0
    data = _load(ann)
    files = {p.name for p in (tmp_path / "images" / "train").iterdir()}
    print(f"\nsynthetic: 2000 instances ({len(files)} images) in {dt:.2f}s = {2000 / dt:.0f} instances/s")
    assert sum(a["num_keypoints"] > 0 for a in data["annotations"]) == 2000
    assert files == {im["file_name"] for im in data["images"]} and 1000 <= len(files) <= 2000
    assert {a["image_id"] for a in data["annotations"]} == {im["id"] for im in data["images"]}
