"""Every built-in keypoint set read from a file in its publisher's layout (tests/data/<set>/, written by
tests/data/make_publisher_files.py), with the set named and recognised from the file: the loader, the
heatmap codec round trip on ground-truth boxes scored by the set's protocol, the protocols' numbers when
predictions are off by known amounts, the one-line file errors, and the evaluate CLI with each protocol."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vitpose.data.coco import TopDownCocoDataset
from vitpose.data.keypoints import BUILTIN_SETS, get_keypoint_set
from vitpose.data.keypoints.layouts import load_keypoint_file
from vitpose.data.keypoints.set import KeypointSetError
from vitpose.evaluation import HEADLINE, PROTOCOL_METRICS, CocoKeypointEvaluator, decode_batch_to_predictions

DATA = Path(__file__).parent / "data"
SETS = {"coco": "coco", "crowdpose": "crowdpose", "mpii": "pckh", "aic": "coco", "coco_wholebody": "wholebody",
        "ap10k": "coco", "onehand10k": "pck"}  # fmt: skip


def ann_of(name: str) -> Path:
    return next((DATA / name / "annotations").glob("*.json"))


def dataset(name: str, named: bool) -> TopDownCocoDataset:
    return TopDownCocoDataset(ann_of(name), DATA / name / "images", train=False,
                              keypoints=get_keypoint_set(name) if named else None)


def round_trip(ds: TopDownCocoDataset) -> list[dict]:
    """The ground truth encoded as the val crops' heatmap targets, decoded back to image coordinates."""
    items = [ds.load(i) for i in range(len(ds))]
    metas = torch.utils.data.default_collate(
        [{k: it[k] for k in ("center", "scale", "image_id", "bbox_score", "ann_id", "category_id")} for it in items])
    return decode_batch_to_predictions(torch.stack([it["target"] for it in items]), metas, input_size=ds.input_size)


def perfect(ds: TopDownCocoDataset) -> list[dict]:
    return [{"image_id": i.image_id, "ann_id": i.ann_id, "category_id": i.category_id, "bbox_score": 1.0,
             "area": i.area, "keypoints": np.concatenate([i.keypoints[:, :2], np.ones((len(i.keypoints), 1))], 1)}
            for i in ds.instances]


# ----------------------------------------------------------------------------------- loader + round trip
@pytest.mark.parametrize("named", [True, False], ids=["named", "recognised"])
@pytest.mark.parametrize("name", sorted(SETS))
def test_publisher_file_loads_and_round_trips_with_its_protocol(name, named):
    ds = dataset(name, named)
    assert ds.keypoint_set is BUILTIN_SETS[name] and len(ds) >= 3
    evaluator = CocoKeypointEvaluator(ds.ann_file, keypoints=None if not named else ds.keypoint_set)
    assert evaluator.protocol == SETS[name] and evaluator.keypoint_set is BUILTIN_SETS[name]
    metrics = evaluator.evaluate(round_trip(ds))
    print(f"\n{name} ({'named' if named else 'recognised'}), protocol {evaluator.protocol}: "
          + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k not in ("APm", "APl", "ARm", "ARl")))
    assert set(metrics) == set(PROTOCOL_METRICS[SETS[name]])
    assert metrics[HEADLINE[SETS[name]]] >= 0.99 and metrics["AP"] >= 0.99


def test_missing_fields_are_derived_as_the_reference_toolkits_do():
    crowd = load_keypoint_file(ann_of("crowdpose"))["annotations"][0]
    raw = json.loads(ann_of("crowdpose").read_text())["annotations"][0]
    assert "area" not in raw and crowd["area"] == pytest.approx(raw["bbox"][2] * raw["bbox"][3] * 0.53)
    hand = load_keypoint_file(ann_of("onehand10k"))["annotations"][0]
    assert hand["num_keypoints"] == 21 and hand["iscrowd"] == 0
    mpii = load_keypoint_file(ann_of("mpii"))
    people = json.loads(ann_of("mpii").read_text())
    first, p = mpii["annotations"][0], people[0]
    assert len(mpii["images"]) == 3 and len(mpii["annotations"]) == len(people)
    side = p["scale"] * 200  # the box around 'center' moved down 15 px per unit of scale, MATLAB's 1-based -> 0
    assert first["bbox"] == pytest.approx([p["center"][0] - 1 - side / 2, p["center"][1] + 15 * p["scale"] - 1 - side / 2,
                                           side, side])
    assert first["keypoints"][:2] == pytest.approx([p["joints"][0][0] - 1, p["joints"][0][1] - 1])


@pytest.mark.parametrize("named", [True, False], ids=["named", "recognised"])
def test_ai_challengers_own_release_layout_reads_like_its_coco_conversion(named):
    raw = DATA / "aic" / "raw" / "keypoint_validation_annotations_20170911.json"
    ds = TopDownCocoDataset(raw, DATA / "aic" / "images", train=False,
                            keypoints=get_keypoint_set("aic") if named else None)
    coco = dataset("aic", named=True)
    assert ds.keypoint_set is BUILTIN_SETS["aic"] and len(ds) == len(coco)
    for a, b in zip(ds.instances, coco.instances, strict=True):  # the release stores whole pixels
        assert a.file_name == b.file_name and np.array_equal(a.keypoints[:, 2], b.keypoints[:, 2])
        assert np.abs(a.keypoints[:, :2] - b.keypoints[:, :2]).max() <= 0.5
    assert CocoKeypointEvaluator(raw, keypoints=ds.keypoint_set).evaluate(round_trip(ds))["AP"] >= 0.99


def test_ap10k_species_each_keep_their_category():
    ds = dataset("ap10k", named=False)
    assert len(ds.category_ids) == 54 and len({i.category_id for i in ds.instances}) == 6
    preds = round_trip(ds)
    assert [p["category_id"] for p in preds] == [i.category_id for i in ds.instances]
    evaluator = CocoKeypointEvaluator(ds.ann_file)
    results = evaluator.rescore_and_nms(preds)
    assert sorted(r["category_id"] for r in results) == sorted(i.category_id for i in ds.instances)
    assert evaluator.evaluate(preds)["AP"] >= 0.99
    wrong = [{**p, "category_id": 2} for p in preds]  # every animal called an argali sheep: nothing matches
    assert evaluator.evaluate(wrong)["AP"] == 0.0
    unlabelled = [{k: v for k, v in p.items() if k != "category_id"} for p in preds]  # scored as one class
    assert CocoKeypointEvaluator(ds.ann_file).evaluate(unlabelled)["AP"] >= 0.99


def noisy_predictions(name: str, seed: int = 3) -> tuple[TopDownCocoDataset, list[dict]]:
    """The ground truth with 4 px of noise and scores in 0.3..1: predictions whose AP is neither 0 nor 1."""
    ds = dataset(name, named=True)
    preds = perfect(ds)
    rng = np.random.default_rng(seed)
    for p in preds:
        p["keypoints"][:, :2] += rng.normal(0, 4, p["keypoints"][:, :2].shape)
        p["keypoints"][:, 2] = rng.uniform(0.3, 1, len(p["keypoints"]))
    return ds, preds


# ------------------------------------------------------------------------------ protocols' numbers
# xtcocotools 1.14.3's own COCOeval (keypoints_crowd with use_area=False; keypoints_<part> with use_area=True)
# on these files and predictions, as tests/data/xtcocotools_reference.py prints them (AP_medium: the toolkit
# rounds the split APs to 4 places).
XTCOCOTOOLS_CROWDPOSE = {"AP": 0.933663, "AP50": 1.0, "AP75": 1.0, "AR": 0.933333, "AR50": 1.0, "AR75": 1.0,
                         "AP_easy": 0.9, "AP_medium": 0.9337, "AP_hard": 1.0}
XTCOCOTOOLS_WHOLEBODY = {"body": (0.764521, 0.783333), "foot": (0.883168, 0.9), "face": (0.002805, 0.016667),
                         "lefthand": (0.267987, 0.36), "righthand": (0.27665, 0.316667),
                         "wholebody": (0.084901, 0.133333)}


def test_crowdpose_and_wholebody_reproduce_xtcocotools():
    ds, preds = noisy_predictions("crowdpose")
    m = CocoKeypointEvaluator(ds.ann_file).evaluate(preds)
    for k, v in XTCOCOTOOLS_CROWDPOSE.items():
        assert m[k] == pytest.approx(v, abs=1e-4 if k == "AP_medium" else 1e-6), k
    ds, preds = noisy_predictions("coco_wholebody")
    m = CocoKeypointEvaluator(ds.ann_file).evaluate(preds)
    for part, (ap, ar) in XTCOCOTOOLS_WHOLEBODY.items():
        assert (m[f"{part}_AP"], m[f"{part}_AR"]) == pytest.approx((ap, ar), abs=1e-6), part


def mpii_head_sizes(gt_file: Path) -> np.ndarray:
    """0.6 x the head box diagonal per person, read from MPII's ground-truth file with scipy, as MPII does."""
    from scipy.io import loadmat

    boxes = loadmat(str(gt_file))["headboxes_src"]
    return 0.6 * np.linalg.norm(boxes[1] - boxes[0], axis=0)


def test_pckh_counts_joints_within_half_a_head_and_leaves_out_pelvis_and_thorax():
    ds = dataset("mpii", named=True)
    preds = perfect(ds)
    ev = CocoKeypointEvaluator(ds.ann_file)
    anns = ev.coco.anns
    heads = mpii_head_sizes(DATA / "mpii" / "annotations" / "mpii_gt_val.mat")
    for p in preds:  # right wrist (10) off by 0.6 head sizes: a miss; pelvis (6) off by 5: not in the total
        p["keypoints"][10, 0] += 0.6 * heads[p["ann_id"] - 1]
        p["keypoints"][6, 0] += 5 * heads[p["ann_id"] - 1]
    m = ev.evaluate(preds)
    labelled = np.array([np.asarray(anns[p["ann_id"]]["keypoints"]).reshape(16, 3)[:, 2] > 0 for p in preds])
    counted = labelled[:, [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15]].sum()
    assert m["PCKh"] == pytest.approx(1 - labelled[:, 10].sum() / counted)
    assert m["PCKh_wrist"] == pytest.approx(0.5) and m["PCKh_head"] == 1.0 and m["PCKh_0.1"] == m["PCKh"]


@pytest.mark.parametrize("with_gt_file", [True, False], ids=["mpii_gt_val.mat", "json-alone"])
def test_pckh_head_size_comes_from_mpiis_head_boxes_when_they_ship_beside_the_json(tmp_path, with_gt_file):
    """Left wrists off by 0.55 of MPII's head size: a miss against the head boxes of mpii_gt_val.mat, a hit
    against the neck-head segment used when the json comes alone (the boxes here are 0.87 of that segment)."""
    shutil.copy(ann_of("mpii"), tmp_path / "mpii_val.json")
    if with_gt_file:
        shutil.copy(DATA / "mpii" / "annotations" / "mpii_gt_val.mat", tmp_path)
    ds = TopDownCocoDataset(tmp_path / "mpii_val.json", DATA / "mpii" / "images", train=False)
    heads = mpii_head_sizes(DATA / "mpii" / "annotations" / "mpii_gt_val.mat")
    preds = perfect(ds)
    for p in preds:
        p["keypoints"][15, 0] += 0.55 * heads[p["ann_id"] - 1]
    m = CocoKeypointEvaluator(ds.ann_file).evaluate(preds)
    assert m["PCKh_wrist"] == pytest.approx(0.5 if with_gt_file else 1.0)


def test_mpii_head_boxes_of_another_split_or_order_are_refused_in_one_line(tmp_path):
    from scipy.io import loadmat, savemat

    gt = loadmat(str(DATA / "mpii" / "annotations" / "mpii_gt_val.mat"))
    shutil.copy(ann_of("mpii"), tmp_path / "mpii_val.json")
    fewer = {k: gt[k][..., :-1] for k in ("headboxes_src", "pos_gt_src", "jnt_missing")}
    savemat(tmp_path / "mpii_gt_val.mat", {**fewer, "dataset_joints": gt["dataset_joints"]})
    with pytest.raises(ValueError, match=r"mpii_gt_val.mat holds 5 people and .*mpii_val.json 6; .* same split"):
        load_keypoint_file(tmp_path / "mpii_val.json")
    swapped = {k: gt[k][..., [1, 0, 2, 3, 4, 5]] for k in ("headboxes_src", "pos_gt_src", "jnt_missing")}
    savemat(tmp_path / "mpii_gt_val.mat", {**swapped, "dataset_joints": gt["dataset_joints"]})
    with pytest.raises(ValueError, match=r"person #0's joints differ from .*same people in the same order"):
        load_keypoint_file(tmp_path / "mpii_val.json")
    shutil.copy(tmp_path / "mpii_val.json", tmp_path / "mpii_train.json")  # a train json beside the val boxes
    (tmp_path / "mpii_train.json").write_text(json.dumps(json.loads(ann_of("mpii").read_text())[:4]))
    assert all("headbox" not in a for a in load_keypoint_file(tmp_path / "mpii_train.json")["annotations"])


def test_hand_pck_is_normalised_by_the_box_and_epe_is_in_pixels():
    ds = dataset("onehand10k", named=True)
    ev = CocoKeypointEvaluator(ds.ann_file)
    preds = perfect(ds)
    for p in preds:  # thumb tip off by 0.25 x the box's larger side: outside PCK@0.2
        box = ev.coco.anns[p["ann_id"]]["bbox"]
        p["keypoints"][4, 1] += 0.25 * max(box[2], box[3])
    m = ev.evaluate(preds)
    assert m["PCK"] == pytest.approx(20 / 21)
    sides = [max(ev.coco.anns[p["ann_id"]]["bbox"][2:]) for p in preds]
    assert m["EPE"] == pytest.approx(0.25 * np.mean(sides) / 21)
    assert m["AUC"] == pytest.approx(0.95 * 20 / 21)  # the thumb tip is > 30 px off; the rest at 0 px


def test_crowdpose_splits_by_crowd_index():
    ds = dataset("crowdpose", named=True)
    ev = CocoKeypointEvaluator(ds.ann_file)
    index = {im["id"]: im["crowdIndex"] for im in ev.coco.dataset["images"]}
    preds = perfect(ds)
    for p in preds:
        if index[p["image_id"]] >= 0.8:  # the hard image's people 40 px off
            p["keypoints"][:, :2] += 40
    m = ev.evaluate(preds)
    assert m["AP_easy"] == 1.0 and m["AP_medium"] == 1.0 and m["AP_hard"] == 0.0 and 0 < m["AP"] < 1
    with pytest.raises(ValueError, match="has no 'crowdIndex'"):
        CocoKeypointEvaluator(ann_of("coco"), protocol="crowdpose").evaluate(perfect(dataset("coco", True)))


def test_crowdpose_default_protocol_on_a_file_without_crowd_index_reports_no_split(tmp_path):
    """Training's per-epoch validation on a remapped file (no crowdIndex) keeps going: the split is nan."""
    data = json.loads(ann_of("crowdpose").read_text())
    for im in data["images"]:
        del im["crowdIndex"]
    (tmp_path / "c.json").write_text(json.dumps(data))
    ds = TopDownCocoDataset(tmp_path / "c.json", DATA / "crowdpose" / "images", train=False)
    m = CocoKeypointEvaluator(ds.ann_file).evaluate(perfect(ds))
    assert m["AP"] == 1.0 and all(np.isnan(m[f"AP_{n}"]) for n in ("easy", "medium", "hard"))


def test_crowdpose_oks_uses_the_box_area_not_the_files(tmp_path):
    """xtcocotools' use_area=False: a file's own 'area' is not what CrowdPose's OKS divides by."""
    ds = dataset("crowdpose", named=True)
    preds = perfect(ds)
    for p in preds:
        p["keypoints"][:, :2] += 6
    box_area = CocoKeypointEvaluator(ds.ann_file).evaluate(preds)["AP"]
    data = json.loads(ds.ann_file.read_text())
    for a in data["annotations"]:
        a["area"] = 1e6  # huge areas: every pose matches under COCO's OKS
    (tmp_path / "area.json").write_text(json.dumps(data))
    assert box_area < 0.9
    assert CocoKeypointEvaluator(tmp_path / "area.json").evaluate(preds)["AP"] == pytest.approx(box_area)
    assert CocoKeypointEvaluator(tmp_path / "area.json", protocol="coco").evaluate(preds)["AP"] == 1.0


def test_wholebody_scores_each_part_alone():
    ds = dataset("coco_wholebody", named=False)
    ev = CocoKeypointEvaluator(ds.ann_file)
    preds = perfect(ds)
    for p in preds:
        p["keypoints"][91:112, :2] += 30  # left hands 30 px off
    m = ev.evaluate(preds)
    assert m["body_AP"] == m["foot_AP"] == m["face_AP"] == m["righthand_AP"] == 1.0
    assert m["lefthand_AP"] == 0.0 and 0 < m["wholebody_AP"] < 1 and m["AP"] == m["wholebody_AP"]


# ------------------------------------------------------------------------------------ file problems
def test_file_problems_are_one_line_naming_file_field_and_fix(tmp_path):
    data = json.loads(ann_of("onehand10k").read_text())
    del data["annotations"][1]["bbox"]
    (tmp_path / "a.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"a\.json: annotation id 2 has no 'bbox'; add its person box") as err:
        TopDownCocoDataset(tmp_path / "a.json", DATA / "onehand10k" / "images", train=False)
    assert "\n" not in str(err.value)
    data = json.loads(ann_of("aic").read_text())
    data["categories"][0]["keypoints"][12] = "Crown"  # not a name of any set
    (tmp_path / "b.json").write_text(json.dumps(data))
    with pytest.raises(KeypointSetError, match=r"b\.json: its keypoint names match no built-in set; closest is 'aic' "
                                               r"\(file only: 'Crown'; set only: 'head_top'\)"):
        TopDownCocoDataset(tmp_path / "b.json", DATA / "aic" / "images", train=False)
    with pytest.raises(KeypointSetError, match=r"do not match keypoint set 'aic': file only: 'Crown'"):
        TopDownCocoDataset(tmp_path / "b.json", DATA / "aic" / "images", train=False, keypoints=get_keypoint_set("aic"))
    people = json.loads(ann_of("mpii").read_text())
    del people[2]["scale"]
    (tmp_path / "c.json").write_text(json.dumps(people))
    with pytest.raises(ValueError, match=r"c\.json: person #2 has no 'scale'"):
        TopDownCocoDataset(tmp_path / "c.json", DATA / "mpii" / "images", train=False)


# ------------------------------------------------------------------------------------- evaluate CLI
@pytest.fixture(scope="module")
def bare_weights(tmp_path_factory) -> dict[int, Path]:
    """Untrained nano weights stored without a keypoint set, one per keypoint count."""
    from vitpose.models import build_model, save_safetensors

    out = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    return {k: save_safetensors(build_model("vitpose_nano", num_keypoints=k, img_size=(64, 48)), out / f"k{k}.safetensors")
            for k in sorted({s.num_keypoints for s in BUILTIN_SETS.values()})}


@pytest.mark.parametrize("name", sorted(SETS))
def test_evaluate_cli_reports_the_sets_protocol_named_and_recognised(name, bare_weights, tmp_path, capsys):
    import pipelines.evaluate as evaluate_cli

    weights = bare_weights[BUILTIN_SETS[name].num_keypoints]
    common = ["--model", str(weights), "--data-root", str(DATA / name), "--ann", f"annotations/{ann_of(name).name}",
              "--images", "images", "--batch-size", "8"]
    assert evaluate_cli.main([*common, "--keypoints", name, "--out", str(tmp_path / "named")]) == 0
    assert evaluate_cli.main([*common, "--out", str(tmp_path / "recognised")]) == 0
    printed = capsys.readouterr().out
    assert f"{SETS[name]}: {HEADLINE[SETS[name]]} " in printed
    named, found = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("named", "recognised"))
    assert named["settings"]["keypoints"] == found["settings"]["keypoints"] == name
    assert named["settings"]["protocol"] == found["settings"]["protocol"] == SETS[name]
    assert set(named["metrics"]) == set(PROTOCOL_METRICS[SETS[name]])
    assert json.dumps(named["metrics"]) == json.dumps(found["metrics"])  # the same weights, the same set


def test_evaluate_cli_protocol_override_and_mlflow_names(bare_weights, tmp_path, capsys):
    import mlflow

    import pipelines.evaluate as evaluate_cli
    from tests.helpers_serving import sqlite_store

    uri, _ = sqlite_store(tmp_path / "mlflow")
    root = tmp_path / "mpii"
    shutil.copytree(DATA / "mpii", root)
    common = ["--model", str(bare_weights[16]), "--data-root", str(root), "--ann", "annotations/mpii_val.json",
              "--images", "images"]
    assert evaluate_cli.main([*common, "--out", str(tmp_path / "a"), "--mlflow-run-name", "mpii",
                              "--experiment", "protocols", "--tracking-uri", uri]) == 0
    client = mlflow.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("protocols").experiment_id])[0]
    assert {"eval/PCKh", "eval/PCKh_0.1", "eval/PCKh_wrist", "eval/AP"} <= set(run.data.metrics)
    assert run.data.params["protocol"] == "pckh"
    assert evaluate_cli.main([*common, "--out", str(tmp_path / "b"), "--protocol", "coco"]) == 0
    assert set(json.loads((tmp_path / "b/metrics.json").read_text())["metrics"]) == set(PROTOCOL_METRICS["coco"])
    capsys.readouterr()
    assert evaluate_cli.main([*common, "--protocol", "wholebody"]) == 2
    assert "protocol 'wholebody' scores COCO-WholeBody's five parts" in capsys.readouterr().err
