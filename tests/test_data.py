"""Dataset and transforms: the mini COCO index, item format, UDP geometry, replayable augmentation that keeps
pixels and keypoints aligned, image decoding, and every kind of bad input in both on_bad_sample modes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import MINI
from tests.conftest import MINI_ANN as ANN
from tests.conftest import MINI_DETS as DETS
from vitpose.data.coco import ITEM_KEYS, BadSampleError, TopDownCocoDataset, load_image
from vitpose.data.keypoints import flip_pairs_from_names
from vitpose.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugConfig,
    AugParams,
    Photometric,
    apply_aug,
    box_to_center_scale,
    normalize,
    sample_aug_params,
    udp_warp_matrix,
    val_crop,
)

COCO_NAMES = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
    "right_knee", "left_ankle", "right_ankle",
]  # fmt: skip
COCO_PAIRS = [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)]


# ------------------------------------------------------------------------------------ mini COCO
def test_mini_coco_index_and_item_format():
    ds = TopDownCocoDataset(ANN, MINI / "images", train=False)
    assert len(ds) == 12  # 14 annotations, 2 without keypoints filtered
    assert ds.filtered_counts == {"no_keypoints": 2}
    assert ds.keypoint_names == COCO_NAMES and ds.flip_pairs == COCO_PAIRS
    assert ds.skeleton[0] == (15, 13)  # COCO's 1-based [16, 14]
    assert ds.upper_body_ids == list(range(11))
    item = ds[0]
    assert set(item) == set(ITEM_KEYS)
    assert item["image"].shape == (3, 256, 192) and item["image"].dtype == torch.float32
    assert item["target"].shape == (17, 64, 48) and item["target_weight"].shape == (17,)
    assert item["ann_id"] == 442619 and item["image_id"] == 785 and not item["flipped"]
    batch = torch.utils.data.default_collate([ds[0], ds[1], ds[2]])
    assert batch["image"].shape == (3, 3, 256, 192) and batch["center"].shape == (3, 2)
    assert batch["aug_params"].shape == (3, AugParams.ARRAY_SIZE)
    # The padded box has the input aspect ratio and contains the GT box.
    inst = ds.instances[0]
    assert inst.scale[0] / inst.scale[1] == pytest.approx(192 / 256)
    assert inst.scale[1] == pytest.approx(346.68 * 1.25, rel=1e-4)


def test_mini_coco_detections_and_threshold():
    ds = TopDownCocoDataset(ANN, MINI / "images", train=False, det_file=DETS)
    assert len(ds) == 118
    assert {inst.ann_id for inst in ds.instances} == {-1}
    dets = json.loads(DETS.read_text())
    high = TopDownCocoDataset(ANN, MINI / "images", train=False, det_file=DETS, det_score_thr=0.5)
    assert len(high) == sum(d["score"] >= 0.5 for d in dets)
    item = high[0]
    assert item["ann_id"] == -1 and 0.5 <= float(item["bbox_score"]) <= 1.0
    assert float(item["target_weight"].sum()) == 0.0  # detections carry no keypoints
    with pytest.raises(ValueError, match="train=True"):
        TopDownCocoDataset(ANN, MINI / "images", train=True, det_file=DETS)


def test_training_views_are_seeded_and_replayable():
    ds = TopDownCocoDataset(ANN, MINI / "images", train=True, aug_seed=7)
    a, b = ds[3], ds[3]
    assert torch.equal(a["image"], b["image"]) and np.array_equal(a["aug_params"], b["aug_params"])
    replay = ds.load(3, AugParams.from_array(a["aug_params"]))
    assert torch.equal(replay["image"], a["image"]) and torch.equal(replay["target"], a["target"])
    ds.set_epoch(1)
    assert not np.array_equal(ds[3]["aug_params"], a["aug_params"])
    views = [ds.sample_params(i) for i in range(len(ds))]
    assert any(v.flip for v in views) or any(v.rotation for v in views)


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        TopDownCocoDataset(tmp_path / "nope.json", tmp_path, train=False)
    ann = tmp_path / "a.json"
    ann.write_text("{}")
    with pytest.raises(FileNotFoundError, match="no_images"):
        TopDownCocoDataset(ann, tmp_path / "no_images", train=False)


# ---------------------------------------------------------------------------------- geometry
def mmpose_get_warp_matrix(theta, size_input, size_dst, size_target):
    """mmpose 0.x mmpose/core/post_processing/post_transforms.py::get_warp_matrix, transcribed."""
    theta = np.deg2rad(theta)
    m = np.zeros((2, 3), dtype=np.float64)
    sx = size_dst[0] / size_target[0]
    sy = size_dst[1] / size_target[1]
    m[0, 0] = np.cos(theta) * sx
    m[0, 1] = -np.sin(theta) * sx
    m[0, 2] = sx * (
        -0.5 * size_input[0] * np.cos(theta) + 0.5 * size_input[1] * np.sin(theta) + 0.5 * size_target[0]
    )
    m[1, 0] = np.sin(theta) * sy
    m[1, 1] = np.cos(theta) * sy
    m[1, 2] = sy * (
        -0.5 * size_input[0] * np.sin(theta) - 0.5 * size_input[1] * np.cos(theta) + 0.5 * size_target[1]
    )
    return m


def test_udp_warp_matrix_matches_mmpose():
    c, s = np.array([301.5, 180.25]), np.array([210.0, 280.0])
    for r in (0.0, 25.0, -63.0):
        ours = udp_warp_matrix(c, s, r, (256, 192))
        ref = mmpose_get_warp_matrix(r, c * 2.0, np.array([192.0, 256.0]) - 1.0, s)
        np.testing.assert_allclose(ours, ref, atol=1e-9)
    # The box centre lands on the crop's centre pixel grid point, and flip mirrors about it.
    m = udp_warp_matrix(c, s, 0.0, (256, 192), flip=True)
    np.testing.assert_allclose(m @ [*c, 1.0], [95.5, 127.5])
    np.testing.assert_allclose(m @ [c[0] - 10, c[1], 1.0], [95.5 + 10 * 191 / 210, 127.5])


def test_box_to_center_scale_keeps_aspect_and_padding():
    c, s = box_to_center_scale([10, 20, 30, 200], 0.75)
    np.testing.assert_allclose(c, [25, 120])
    np.testing.assert_allclose(s, [150 * 1.25, 200 * 1.25])
    _, s = box_to_center_scale([0, 0, 300, 100], 0.75, padding=1.0)
    np.testing.assert_allclose(s, [300, 400])


def test_flip_pairs_from_names():
    assert flip_pairs_from_names(COCO_NAMES) == COCO_PAIRS
    assert flip_pairs_from_names(["head", "left_hand", "right_hand", "left_x"]) == [(1, 2)]


def _marker_image(rng):
    """Image with 17 distinct, saturated colour discs at random keypoints; returns (image, kps, colours)."""
    img = np.full((360, 300, 3), 128, np.uint8)
    kps = np.zeros((17, 3))
    colours = []
    import cv2

    grid = [(x, y) for x in range(40, 270, 45) for y in range(40, 330, 50)]
    order = rng.permutation(len(grid))[:17]
    for j, g in enumerate(order):
        x, y = grid[g]
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        while min(np.abs(np.array(colour) - np.array(c)).sum() for c in [*colours, (128, 128, 128)]) < 90:
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        colours.append(colour)
        cv2.circle(img, (x, y), 9, colour, -1)
        kps[j] = (x, y, 2)
    return img, kps, np.array(colours)


@pytest.mark.parametrize("seed", range(6))
def test_augmentation_keeps_image_and_keypoints_aligned(seed):
    rng = np.random.default_rng(seed)
    img, kps, colours = _marker_image(rng)
    center, scale = box_to_center_scale([20, 20, 260, 320], 192 / 256)
    params = AugParams(
        scale_factor=float(rng.uniform(0.9, 1.3)), rotation=float(rng.uniform(-60, 60)), flip=seed % 2 == 1
    )
    crop, out, _, _, _ = apply_aug(img, kps, center, scale, params, (256, 192), COCO_PAIRS)
    swap = list(range(17))
    if params.flip:
        for a, b in COCO_PAIRS:
            swap[a], swap[b] = b, a
    checked = 0
    for j in range(17):
        x, y = out[j, :2]
        if not (3 <= x <= 188 and 3 <= y <= 252):
            continue
        pixel = crop[int(round(y)), int(round(x))].astype(int)
        # Row j now carries label j; its marker is the one drawn for the joint it came from.
        assert np.abs(pixel - colours[swap[j]]).max() <= 3, (j, pixel, colours[swap[j]])
        assert out[j, 2] == 2
        checked += 1
    assert checked >= 10


def test_val_crop_is_the_identity_view():
    img, kps, _ = _marker_image(np.random.default_rng(9))
    center, scale = box_to_center_scale([20, 20, 260, 320], 0.75)
    crop, matrix = val_crop(img, center, scale, (256, 192))
    aug_crop, aug_kps, c, s, aug_matrix = apply_aug(
        img, kps, center, scale, AugParams(), (256, 192), COCO_PAIRS
    )
    np.testing.assert_array_equal(crop, aug_crop)
    np.testing.assert_array_equal(matrix, aug_matrix)
    np.testing.assert_array_equal(c, center)
    np.testing.assert_array_equal(s, scale)


def test_flip_swaps_left_and_right_labels():
    kps = np.array([[100.0, 50.0, 2]] * 17)
    kps[5] = (60, 80, 2)  # left shoulder on the image left
    kps[6] = (140, 80, 1)  # right shoulder on the image right, labelled occluded
    center, scale = np.array([100.0, 100.0]), np.array([150.0, 200.0])
    img = np.zeros((200, 200, 3), np.uint8)
    _, out, _, _, _ = apply_aug(img, kps, center, scale, AugParams(flip=True), (256, 192), COCO_PAIRS)
    # After mirroring, the left-shoulder row holds the point now on the image left: the mirrored right one.
    assert out[5, 0] < out[6, 0]
    assert out[5, 2] == 1 and out[6, 2] == 2  # visibility travels with the joint
    _, plain, _, _, _ = apply_aug(img, kps, center, scale, AugParams(), (256, 192), COCO_PAIRS)
    np.testing.assert_allclose(out[5, 0], 191 - plain[6, 0])


def test_half_body_box_and_sampling_statistics():
    rng = np.random.default_rng(0)
    kps = np.stack([np.linspace(50, 150, 17), np.linspace(20, 300, 17)], axis=1)
    vis = np.full(17, 2)
    cfg = AugConfig()
    params = [
        sample_aug_params(rng, kps, vis, cfg, upper_body_ids=list(range(11)), aspect_ratio=0.75)
        for _ in range(3000)
    ]
    sf = np.array([p.scale_factor for p in params])
    rot = np.array([p.rotation for p in params])
    assert sf.min() >= 0.5 and sf.max() <= 1.5
    assert np.abs(rot).max() <= 80 and 0.5 < np.mean(rot != 0) < 0.7
    assert 0.45 < np.mean([p.flip for p in params]) < 0.55
    hb = [p.half_body for p in params if p.half_body is not None]
    assert 0.25 < len(hb) / len(params) < 0.35
    for _, _, w, h in hb:
        assert w / h == pytest.approx(0.75)
    # Fewer than 9 labelled joints: never half-body (mmpose's > 8 rule).
    few = np.where(np.arange(17) < 8, 2, 0)
    assert all(
        sample_aug_params(rng, kps, few, cfg, upper_body_ids=list(range(11)), aspect_ratio=0.75).half_body
        is None
        for _ in range(200)
    )
    # Determinism: the same generator state gives the same params.
    a = sample_aug_params(
        np.random.default_rng(5), kps, vis, cfg, upper_body_ids=list(range(11)), aspect_ratio=0.75
    )
    b = sample_aug_params(
        np.random.default_rng(5), kps, vis, cfg, upper_body_ids=list(range(11)), aspect_ratio=0.75
    )
    assert a == b
    assert AugParams.from_array(a.to_array()) == a


def test_same_params_and_seed_give_identical_pixels():
    rng = np.random.default_rng(3)
    img, kps, _ = _marker_image(rng)
    center, scale = box_to_center_scale([20, 20, 260, 320], 0.75)
    cfg = AugConfig(photometric_prob=1.0, blur_prob=0.5, noise_prob=0.5)
    p = AugParams(
        scale_factor=1.1,
        rotation=12.0,
        flip=True,
        half_body=(150.0, 120.0, 150.0, 200.0),
        photometric_seed=42,
    )
    a = apply_aug(img, kps, center, scale, p, (256, 192), COCO_PAIRS, Photometric(cfg))[0]
    photometric = Photometric(cfg)
    photometric(a, 1)  # a used instance with another state must not matter
    b = apply_aug(img, kps, center, scale, p, (256, 192), COCO_PAIRS, photometric)[0]
    np.testing.assert_array_equal(a, b)
    other = AugParams(1.1, 12.0, True, (150.0, 120.0, 150.0, 200.0), photometric_seed=43)
    c = apply_aug(img, kps, center, scale, other, (256, 192), COCO_PAIRS, photometric)[0]
    assert not np.array_equal(a, c)
    plain = apply_aug(
        img,
        kps,
        center,
        scale,
        AugParams(1.1, 12.0, True, (150.0, 120.0, 150.0, 200.0)),
        (256, 192),
        COCO_PAIRS,
        photometric,
    )[0]
    assert not np.array_equal(a, plain)


# ------------------------------------------------------------------------------- image decoding
def test_grayscale_rgba_and_exif_rotation_decode_to_rgb(tmp_path):
    Image.fromarray(np.full((20, 30), 77, np.uint8), "L").save(tmp_path / "g.jpg")
    g = load_image(tmp_path / "g.jpg")
    assert g.shape == (20, 30, 3) and np.abs(g.astype(int) - 77).max() <= 2

    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    a = load_image(tmp_path / "a.png")
    assert a.shape == (20, 30, 3) and np.abs(a.astype(int) - [200, 0, 0]).max() <= 2

    # Stored 60 wide x 40 high with a red block top-left; EXIF orientation 6 = "rotate 90 deg clockwise to
    # display", so the displayed image is 40 wide x 60 high with the block top-right.
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:16, :16] = (255, 0, 0)
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    r = load_image(tmp_path / "r.jpg")
    assert r.shape == (60, 40, 3)
    assert r[4, 36, 0] > 200 and r[4, 36, 2] < 60  # top-right is red
    assert r[4, 4].max() < 60 and r[56, 36].max() < 60


# ------------------------------------------------------------------------------------ bad input
def _write_dataset(root: Path, *, n_images=3, anns_per_image=2, exif_rotated=False):
    """A tiny COCO keypoint dataset on disk: random JPEGs and plausible annotations."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i in range(1, n_images + 1):
        w, h = 120, 90
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        if exif_rotated and i == 1:
            im = Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 0, 2)))  # stored 90 x 120
            exif = im.getexif()
            exif[0x0112] = 6
            im.save(root / "images" / f"{i}.jpg", exif=exif)
        else:
            Image.fromarray(pixels).save(root / "images" / f"{i}.jpg")
        images.append({"id": i, "file_name": f"{i}.jpg", "width": w, "height": h})
        for _ in range(anns_per_image):
            kps = np.zeros((17, 3))
            kps[:, 0] = rng.uniform(20, 60, 17)
            kps[:, 1] = rng.uniform(20, 70, 17)
            kps[:, 2] = 2
            anns.append({
                "id": len(anns) + 100, "image_id": i, "category_id": 1, "iscrowd": 0, "bbox": [15, 15, 50, 60],
                "area": 1500.0, "num_keypoints": 17, "keypoints": kps.reshape(-1).round(2).tolist(),
            })  # fmt: skip
    data = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 1, "name": "person", "keypoints": COCO_NAMES, "skeleton": [[16, 14]]}],
    }
    (root / "ann.json").write_text(json.dumps(data))
    return data


def _rewrite(root: Path, data: dict) -> None:
    (root / "ann.json").write_text(json.dumps(data))


def _ds(root: Path, mode: str, **kw) -> TopDownCocoDataset:
    return TopDownCocoDataset(root / "ann.json", root / "images", train=False, on_bad_sample=mode, **kw)


def test_clean_tiny_dataset_and_exif_image_loads(tmp_path):
    _write_dataset(tmp_path, exif_rotated=True)
    ds = _ds(tmp_path, "error")
    assert len(ds) == 6 and not ds.bad_sample_counts
    assert all(ds[i]["image"].shape == (3, 256, 192) for i in range(len(ds)))


def test_missing_image_file(tmp_path):
    _write_dataset(tmp_path)
    (tmp_path / "images" / "2.jpg").unlink()
    with pytest.raises(BadSampleError, match=r"2\.jpg.*annotation id 102") as e:
        _ds(tmp_path, "error")
    assert e.value.reason == "missing_image"
    ds = _ds(tmp_path, "skip")
    assert len(ds) == 4 and ds.bad_sample_counts == {"missing_image": 2}


@pytest.mark.parametrize("content", [b"this is not a jpeg at all" * 10, "truncated"])
def test_corrupt_jpeg(tmp_path, content, caplog):
    _write_dataset(tmp_path)
    path = tmp_path / "images" / "2.jpg"
    if content == "truncated":
        content = path.read_bytes()[:300]
    path.write_bytes(content)
    ds = _ds(tmp_path, "error")  # only decoding can tell
    assert len(ds) == 6
    ds[1]
    with pytest.raises(BadSampleError, match=r"2\.jpg.*annotation id 102.*cannot be decoded") as e:
        ds[2]
    assert e.value.reason == "unreadable_image"
    assert str(e.value).endswith("; or skip such samples: --set data.on_bad_sample=skip")  # the CLI form
    ds = _ds(tmp_path, "skip")
    item = ds[2]  # replaced by the next usable instance, deterministically
    # Skipping already: the warning names the file and the fix, not the option that is on.
    assert "cannot be decoded" in caplog.text and "on_bad_sample" not in caplog.text
    assert item["index"] == 4 and item["ann_id"] == 104
    assert ds[3]["index"] == 4
    assert ds.bad_sample_counts == {"unreadable_image": 2}
    assert ds[2]["index"] == 4 and ds.bad_sample_counts == {"unreadable_image": 2}  # counted once


def test_wrong_keypoint_count(tmp_path):
    data = _write_dataset(tmp_path)
    data["annotations"][3]["keypoints"] = data["annotations"][3]["keypoints"][:-3]
    _rewrite(tmp_path, data)
    with pytest.raises(BadSampleError, match=r"annotation id 103.*48 keypoint values, expected 51"):
        _ds(tmp_path, "error")
    ds = _ds(tmp_path, "skip")
    assert len(ds) == 5 and ds.bad_sample_counts == {"bad_keypoint_count": 1}


@pytest.mark.parametrize(
    ("bbox", "reason"),
    [
        ([15, 15, 0, 60], "zero_area_box"),
        ([15, 15, 50, -3], "zero_area_box"),
        ([500, 15, 50, 60], "box_outside_image"),
        ([-80, 15, 50, 60], "box_outside_image"),
    ],
)
def test_bad_boxes(tmp_path, bbox, reason):
    data = _write_dataset(tmp_path)
    data["annotations"][0]["bbox"] = bbox
    _rewrite(tmp_path, data)
    with pytest.raises(BadSampleError, match=r"annotation id 100.*ann\.json") as e:
        _ds(tmp_path, "error")
    assert e.value.reason == reason
    ds = _ds(tmp_path, "skip")
    assert len(ds) == 5 and ds.bad_sample_counts == {reason: 1}


def test_unknown_image_id_in_detection_file(tmp_path):
    _write_dataset(tmp_path)
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 50], "score": 0.9},
        {"image_id": 99, "category_id": 1, "bbox": [10, 10, 40, 50], "score": 0.8},
        {"image_id": 2, "category_id": 1, "bbox": [10, 10, 0, 50], "score": 0.7},
    ]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    with pytest.raises(BadSampleError, match=r"dets\.json.*image id 99") as e:
        _ds(tmp_path, "error", det_file=tmp_path / "dets.json")
    assert e.value.reason == "unknown_image_id"
    ds = _ds(tmp_path, "skip", det_file=tmp_path / "dets.json")
    assert len(ds) == 1 and ds.bad_sample_counts == {"unknown_image_id": 1, "zero_area_box": 1}


def test_crowd_and_unlabelled_people_are_filtered_not_bad(tmp_path):
    data = _write_dataset(tmp_path)
    data["annotations"][0]["iscrowd"] = 1
    data["annotations"][1]["keypoints"] = [0] * 51
    data["annotations"][1]["num_keypoints"] = 0
    _rewrite(tmp_path, data)
    ds = TopDownCocoDataset(tmp_path / "ann.json", tmp_path / "images", train=True)
    assert len(ds) == 4 and ds.filtered_counts == {"crowd": 1, "no_keypoints": 1} and not ds.bad_sample_counts


def test_image_size_mismatch_is_reported(tmp_path):
    data = _write_dataset(tmp_path)
    data["images"][0]["width"] = 121
    _rewrite(tmp_path, data)
    with pytest.raises(BadSampleError, match=r"1\.jpg.*120x90.*121x90"):
        _ds(tmp_path, "error")[0]


def test_image_cache_gives_the_same_items_within_its_budget(tmp_path):
    """Decoded images kept in memory: same items as decoding every time, read-only, and no more than the
    budget (each 120x90 RGB image is 32,400 bytes; a 0.07 MB budget holds two of the three)."""
    _write_dataset(tmp_path)
    plain = TopDownCocoDataset(tmp_path / "ann.json", tmp_path / "images", train=True, aug_seed=3)
    cached = TopDownCocoDataset(tmp_path / "ann.json", tmp_path / "images", train=True, aug_seed=3,
                                image_cache_mb=0.07)
    for epoch in (0, 1):
        plain.set_epoch(epoch), cached.set_epoch(epoch)
        for i in range(len(plain)):
            a, b = plain[i], cached[i]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])
    assert sorted(cached._image_cache) == ["1.jpg", "2.jpg"] and not plain._image_cache
    kept = cached._image_cache["1.jpg"]
    assert cached.read_image(0) is kept and not kept.flags.writeable
    (tmp_path / "images" / "1.jpg").unlink()  # served from memory now; 3.jpg was never kept
    assert cached[0]["index"] == 0
    (tmp_path / "images" / "3.jpg").unlink()
    with pytest.raises(BadSampleError, match="3.jpg"):
        cached.load(4)


def test_normalize_is_imagenet_mean_std_in_chw() -> None:
    crop = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    for c in (crop, crop[5:25, 3:19]):  # contiguous and a view
        expected = (c.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        out = normalize(c)
        assert out.dtype == np.float32 and out.flags["C_CONTIGUOUS"] and out.shape == (3, *c.shape[:2])
        np.testing.assert_allclose(out, expected.transpose(2, 0, 1), rtol=0, atol=1e-6)
