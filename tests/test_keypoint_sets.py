"""Keypoint sets (``data.keypoints``): the built-in definitions, custom sets, the mismatch errors, and a
CrowdPose-format (14) and a COCO-WholeBody-format (133, separate foot/face/hand fields) file, both made here
from the real COCO mini data, each through loading, a tiny training run, COCOeval with the set's sigmas,
the predictor's output names, `mlflow models serve`, ONNX metadata and the evaluate CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import MINI_ANN, MINI_IMAGES, tiny_config
from vitpose.config import ConfigError
from vitpose.data.coco import TopDownCocoDataset
from vitpose.data.keypoints import BUILTIN_SETS, get_keypoint_set, keypoint_info
from vitpose.data.keypoints.set import KeypointSet, KeypointSetError
from vitpose.evaluation import CocoKeypointEvaluator

CROWDPOSE, WHOLEBODY, COCO = BUILTIN_SETS["crowdpose"], BUILTIN_SETS["coco_wholebody"], BUILTIN_SETS["coco"]
PUBLISHED_COUNTS = {"coco": 17, "crowdpose": 14, "mpii": 16, "aic": 14, "coco_wholebody": 133, "ap10k": 17,
                    "onehand10k": 21}


# ------------------------------------------------------------------------------------------ definitions
def test_every_builtin_has_its_published_count_and_the_cli_lists_them(capsys):
    from vitpose.data.keypoints.__main__ import main

    assert {n: s.num_keypoints for n, s in BUILTIN_SETS.items()} == PUBLISHED_COUNTS
    assert main(["--list"]) == 0
    listed = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
    assert listed == {**{n: str(k) for n, k in PUBLISHED_COUNTS.items()}, "custom": "-"}


@pytest.mark.parametrize("name", sorted(PUBLISHED_COUNTS))
def test_set_definition_is_consistent(name):
    s = BUILTIN_SETS[name]
    k = s.num_keypoints
    flip = s.flip_index()
    assert sorted(flip) == list(range(k)) and all(flip[flip[i]] == i for i in range(k))  # an involution
    for a, b in s.flip_pairs:  # partners are mirror names: left_X <-> right_X (or two face points)
        na, nb = s.names[a], s.names[b]
        assert na.replace("left_", "right_") == nb or (na.startswith("face-") and nb.startswith("face-")), (na, nb)
    sided = [n for n in s.names if n.startswith(("left_", "right_"))]
    assert len(sided) == 2 * sum(s.names[a].startswith("left_") for a, _ in s.flip_pairs)  # every side paired
    assert len(s.sigmas) == k and all(0.005 < v < 0.2 for v in s.sigmas)
    assert len(s.joint_weights) == k
    assert all(0 <= a < k and 0 <= b < k and a != b for a, b in s.skeleton)
    assert sum(n for _, n in s.parts) == k
    assert KeypointSet.from_info(s.to_info()).to_info() == s.to_info()


def test_wholebody_layout_and_sigmas_are_cocowholebodys():
    assert [f for f, _ in WHOLEBODY.parts] == ["keypoints", "foot_kpts", "face_kpts", "lefthand_kpts", "righthand_kpts"]
    assert WHOLEBODY.names[:17] == COCO.names and WHOLEBODY.sigmas[:17] == COCO.sigmas
    assert WHOLEBODY.names[17] == "left_big_toe" and WHOLEBODY.names[91] == "left_hand_root"
    assert WHOLEBODY.sigmas[91:112] == WHOLEBODY.sigmas[112:133]  # the two hands share theirs
    assert WHOLEBODY.flip_index()[23] == 39 and WHOLEBODY.flip_index()[31] == 31  # face-0 <-> face-16, chin


def test_bad_sets_are_refused_naming_the_problem():
    with pytest.raises(KeypointSetError, match="2 OKS sigmas for 3 keypoints"):
        KeypointSet("x", ("a", "b", "c"), (), (), (0.1, 0.1), ())
    with pytest.raises(KeypointSetError, match=r"flip pair \(0, 2\) reuses"):
        KeypointSet("x", ("a", "b", "c"), ((0, 1), (0, 2)), (), (0.1,) * 3, ())
    with pytest.raises(KeypointSetError, match="out of range"):
        KeypointSet("x", ("a", "b"), (), ((0, 5),), (0.1,) * 2, ())
    with pytest.raises(KeypointSetError, match="unknown keypoint set 'crowd'"):
        get_keypoint_set("crowd")


def test_custom_set_from_yaml_config(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("_base_: " + str(Path(__file__).parents[1] / "configs/teacher/synthetic_tiny.yaml") + "\n"
                        "data:\n  keypoints: custom\n  custom_keypoints:\n    name: paw3\n"
                        "    names: [left_paw, right_paw, tail]\n    flip_pairs: [[left_paw, right_paw]]\n"
                        "    skeleton: [[left_paw, tail], [right_paw, tail]]\n    sigmas: [0.05, 0.05, 0.08]\n")
    from vitpose.build import model_spec_kwargs
    from vitpose.config import load_config

    cfg = load_config(cfg_file)
    s = cfg.data.keypoint_set()
    assert (s.name, s.names, s.flip_pairs, s.skeleton) == ("paw3", ("left_paw", "right_paw", "tail"), ((0, 1),),
                                                           ((0, 2), (1, 2)))
    assert model_spec_kwargs(cfg)["num_keypoints"] == 3  # the set decides the head's width
    with pytest.raises(ConfigError, match=r"data.custom_keypoints.*\('left_paw', 'nose'\) names \['nose'\]"):
        load_config(cfg_file, ["data.custom_keypoints.flip_pairs=[[left_paw, nose]]"])
    with pytest.raises(ConfigError, match="data.keypoints: .*did you mean 'crowdpose'"):
        load_config(None, ["data.keypoints=crowdpos"])
    with pytest.raises(ConfigError, match="model.num_keypoints is 17 but data.keypoints 'crowdpose' has 14"):
        model_spec_kwargs(load_config(None, ["data.keypoints=crowdpose", "model.num_keypoints=17"]))


def test_a_file_of_another_set_is_an_error_naming_both(tmp_path):
    with pytest.raises(KeypointSetError, match=r"person_keypoints_val2017_mini.json has 17 keypoints .*nose.* but "
                                               r"keypoint set 'crowdpose' expects 14 .*left_shoulder"):
        TopDownCocoDataset(MINI_ANN, MINI_IMAGES, train=False, keypoints=CROWDPOSE)
    renamed = json.loads(MINI_ANN.read_text())
    renamed["categories"][0]["keypoints"][0] = "snout"
    (tmp_path / "a.json").write_text(json.dumps(renamed))
    with pytest.raises(KeypointSetError, match=r"do not match keypoint set 'coco': file only: 'snout'; set only: 'nose'"):
        TopDownCocoDataset(tmp_path / "a.json", MINI_IMAGES, train=False, keypoints=COCO)
    # Without a set: one error naming the closest set and the names that differ.
    with pytest.raises(KeypointSetError, match=r"match no built-in set; closest is 'coco' \(file only: 'snout'; "
                                               r"set only: 'nose'\)"):
        TopDownCocoDataset(tmp_path / "a.json", MINI_IMAGES, train=False)


def test_teacher_and_student_must_share_a_set(tmp_path):
    from vitpose.distill.teacher import check_same_keypoints

    root = crowdpose_root(tmp_path)
    ds = TopDownCocoDataset(root / "annotations/crowdpose.json", root / "images", train=False, keypoints=CROWDPOSE)
    check_same_keypoints({"keypoints": CROWDPOSE.to_info()}, ds, "models:/t@current")
    with pytest.raises(ConfigError, match=r"teacher models:/t@current predicts keypoint set 'coco' \(17 .*set "
                                          r"'crowdpose' \(14.*first difference at keypoint #0.*data.keypoints=coco"):
        check_same_keypoints({"keypoints": COCO.to_info()}, ds, "models:/t@current")


def test_a_coco_checkpoint_starts_a_crowdpose_run(tmp_path, capsys):
    from vitpose.build import build_model_from_config, model_spec_kwargs
    from vitpose.models import CheckpointMismatchError, build_model, save_safetensors

    # A COCO model of the tiny config's backbone (its patch size and grid): only the keypoint count differs.
    coco = build_model("vitpose_nano", **model_spec_kwargs(tiny_config(tmp_path)))
    assert coco.spec.num_keypoints == 17
    save_safetensors(coco, tmp_path / "coco17.safetensors")
    cfg = tiny_config(tmp_path, "data.keypoints=crowdpose", f"model.init_checkpoint={tmp_path / 'coco17.safetensors'}")
    model = build_model_from_config(cfg)
    assert model.spec.num_keypoints == 14
    assert torch.equal(model.backbone.patch_embed.proj.weight, coco.backbone.patch_embed.proj.weight)
    coco_sd, sd = coco.state_dict(), model.state_dict()
    final = {"keypoint_head.final_layer.weight", "keypoint_head.final_layer.bias"}
    assert all(torch.equal(v, coco_sd[k]) for k, v in sd.items() if k not in final)  # backbone and deconvs
    assert sd["keypoint_head.final_layer.bias"].shape == (14,)
    out = capsys.readouterr().out  # the report, printed at the start of the run
    assert "2 new" in out and "predicts 17 keypoints, the model 14: its final layer is new" in out

    # A backbone that differs (patch 16 vs the config's 8) is still refused.
    save_safetensors(build_model("vitpose_nano", img_size=(64, 48)), tmp_path / "patch16.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"patch_embed.proj.weight: \(96, 3, 16, 16\) vs \(96, 3, 8, 8\)"):
        build_model_from_config(tiny_config(tmp_path, "data.keypoints=crowdpose",
                                            f"model.init_checkpoint={tmp_path / 'patch16.safetensors'}"))


def test_the_init_checkpoint_report_goes_to_the_mlflow_run(tmp_path):
    """The Trainer of a teacher run or a sweep trial logs the load report of model.init_checkpoint to its run."""
    import mlflow

    from vitpose.build import model_spec_kwargs
    from vitpose.models import build_model, save_safetensors
    from vitpose.run.tracking import WorkerTracker, start_driver_run
    from vitpose.train.loop import Trainer
    from vitpose.train.session import LocalSession

    root = crowdpose_root(tmp_path)
    save_safetensors(build_model("vitpose_nano", **model_spec_kwargs(tiny_config(root))), tmp_path / "coco17.safetensors")
    cfg = tiny_config(root, "data.kind=coco", "data.keypoints=crowdpose", "data.train_ann=annotations/crowdpose.json",
                      "data.train_images=images", "data.val_ann=annotations/crowdpose.json", "data.val_images=images",
                      "deepspeed.zero_stage=0", "train.precision=fp32",
                      f"model.init_checkpoint={tmp_path / 'coco17.safetensors'}")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("init-report", artifact_location=(tmp_path / "mlartifacts").as_uri())
    run_id = start_driver_run(cfg, uri, "init-report", "from-coco", experiment_id=exp)
    Trainer(cfg, LocalSession(tmp_path / "run"), tracker=WorkerTracker(uri, run_id))

    params = client.get_run(run_id).data.params
    got = {k: params[f"init_checkpoint.{k}"] for k in ("format", "preset", "resized", "new", "ignored")}
    assert got == {"format": "vitpose", "preset": "custom", "resized": "0", "new": "2", "ignored": "2"}
    assert int(params["init_checkpoint.loaded"]) > 50
    folder = Path(client.download_artifacts(run_id, "", str(tmp_path / "artifacts")))
    report = json.loads((folder / "init_checkpoint_report.json").read_text())
    assert report["new"] == ["keypoint_head.final_layer.weight", "keypoint_head.final_layer.bias"]
    assert report["path"] == str(tmp_path / "coco17.safetensors") and len(report["loaded"]) == int(params["init_checkpoint.loaded"])
    text = (folder / "init_checkpoint_report.txt").read_text()
    assert "format vitpose" in text and "predicts 17 keypoints, the model 14: its final layer is new" in text


# ------------------------------------------------------------------------------------- file builders
def _mini_root(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "data"
    (root / "annotations").mkdir(parents=True)
    shutil.copytree(MINI_IMAGES, root / "images")
    return root, json.loads(MINI_ANN.read_text())


def crowdpose_root(tmp_path: Path) -> Path:
    """The COCO mini people in CrowdPose's layout: its 12 limb joints, the nose standing in for the top of the
    head, the shoulders' midpoint for the neck; categories with CrowdPose's own names ('head')."""
    root, data = _mini_root(tmp_path)
    for ann in data["annotations"]:
        k = np.asarray(ann["keypoints"], float).reshape(17, 3)
        neck = (k[5] + k[6]) / 2 if k[5, 2] > 0 and k[6, 2] > 0 else np.zeros(3)
        kps = np.concatenate([k[5:17], k[:1], neck[None]])
        ann["keypoints"], ann["num_keypoints"] = kps.round(2).ravel().tolist(), int((kps[:, 2] > 0).sum())
    data["categories"] = [{"id": 1, "name": "person", "supercategory": "person",
                           "keypoints": list(CROWDPOSE.expected_file_names()),
                           "skeleton": [[a + 1, b + 1] for a, b in CROWDPOSE.skeleton]}]
    (root / "annotations/crowdpose.json").write_text(json.dumps(data))
    return root


def wholebody_root(tmp_path: Path) -> Path:
    """The COCO mini people in COCO-WholeBody's layout: body in ``keypoints`` (COCO's category, 17 names),
    6 foot points by the ankles, 68 face points round the nose, 21 points per hand by the wrists, each in its
    own field as COCO-WholeBody stores them."""
    root, data = _mini_root(tmp_path)
    sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    rng = np.random.default_rng(0)

    def around(center: np.ndarray, n: int, radius: float, w: int, h: int) -> list[float]:
        if center[2] <= 0:
            return [0.0] * (3 * n)
        angles = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 0.3)
        xs = np.clip(center[0] + radius * np.cos(angles), 0, w - 1)
        ys = np.clip(center[1] + radius * np.sin(angles), 0, h - 1)
        return np.stack([xs, ys, np.full(n, 2.0)], 1).round(2).ravel().tolist()

    for ann in data["annotations"]:
        w, h = sizes[ann["image_id"]]
        k = np.asarray(ann["keypoints"], float).reshape(17, 3)
        ann["foot_kpts"] = around(k[15], 3, 6, w, h) + around(k[16], 3, 6, w, h)
        ann["face_kpts"] = around(k[0], 68, 8, w, h)
        ann["lefthand_kpts"], ann["righthand_kpts"] = around(k[9], 21, 7, w, h), around(k[10], 21, 7, w, h)
    (root / "annotations/wholebody.json").write_text(json.dumps(data))
    return root


# ------------------------------------------------------------------------------- the two sets end to end
def train_tiny(root: Path, ann: str, keypoints: str, out: Path):
    from vitpose.train.loop import Trainer
    from vitpose.train.session import LocalSession

    cfg = tiny_config(root, "data.kind=coco", f"data.keypoints={keypoints}", f"data.train_ann=annotations/{ann}",
                      "data.train_images=images", f"data.val_ann=annotations/{ann}", "data.val_images=images",
                      "train.epochs=2", "train.batch_size=8", "deepspeed.zero_stage=0", "train.precision=fp32",
                      "data.image_cache_mb=64", "tracking.log_images=0", "train.lr=2e-3")
    session = LocalSession(out)
    trainer = Trainer(cfg, session)
    trainer.fit()
    return trainer, session


def perfect_predictions(ds: TopDownCocoDataset) -> list[dict]:
    return [{"image_id": i.image_id, "keypoints": np.concatenate([i.keypoints[:, :2], np.ones((len(i.keypoints), 1))], 1),
             "bbox_score": 1.0, "area": i.area} for i in ds.instances]


def check_served_names(ckpt: Path, kset: KeypointSet, tmp_path: Path) -> None:
    """Serving's predictor and ONNX export name the set's keypoints, in the heatmap channels' order."""
    import onnx

    from vitpose.deploy.inference import PosePredictor
    from vitpose.deploy.onnx import export_onnx

    predictor = PosePredictor.from_uri(str(ckpt))
    image = np.asarray(np.random.default_rng(0).integers(0, 255, (80, 60, 3)), dtype=np.uint8)
    result = predictor.predict(image, [[5, 5, 40, 60, 0.9]])
    assert result["keypoint_names"] == list(kset.names)
    assert len(result["persons"][0]["keypoints"]) == kset.num_keypoints
    props = {p.key: p.value for p in onnx.load(str(export_onnx(predictor.model, tmp_path / "m.onnx",
                                                                meta=predictor.meta))).metadata_props}
    assert props["vitpose_keypoint_set"] == kset.name and props["vitpose_keypoint_names"].split(",") == list(kset.names)
    assert json.loads(props["vitpose_keypoints"])["sigmas"] == list(kset.sigmas)


def check_served_over_http(ckpt: Path, kset: KeypointSet, tmp_path: Path) -> None:
    """Registered in MLflow and answered by ``mlflow models serve``: one person, the set's count and names."""
    import base64
    import io

    from PIL import Image

    from tests.helpers_serving import ModelServer, register_model, sqlite_store

    uri, exp = sqlite_store(tmp_path / "mlruns")
    meta = json.loads((ckpt / "meta.json").read_text())
    register_model(uri, exp, ckpt / "model.safetensors", meta, f"pose-{kset.name}", "champion")
    buf = io.BytesIO()
    Image.open(next(MINI_IMAGES.glob("*.jpg"))).convert("RGB").save(buf, format="JPEG")
    server = ModelServer(f"models:/pose-{kset.name}@champion", uri, tmp_path / "serve")
    try:
        status, body = server.post({"dataframe_records": [{"image": base64.b64encode(buf.getvalue()).decode(),
                                                           "boxes": [[20, 20, 120, 200, 0.9]]}]})
    finally:
        server.stop()
    assert status == 200, body
    row = body["predictions"][0]
    assert row["keypoint_names"] == list(kset.names), row.get("keypoint_names")
    assert np.asarray(row["persons"][0]["keypoints"]).shape == (kset.num_keypoints, 3)


@pytest.mark.slow
def test_crowdpose_file_trains_evaluates_and_serves(tmp_path, capsys):
    import pipelines.evaluate as evaluate_cli
    from vitpose.models import save_safetensors

    root = crowdpose_root(tmp_path)
    trainer, session = train_tiny(root, "crowdpose.json", "crowdpose", tmp_path / "run")
    ds = trainer.val_ds
    assert ds.num_keypoints == 14 and ds.flip_pairs == list(CROWDPOSE.flip_pairs) and len(ds) == 12
    assert trainer.engine.module.spec.num_keypoints == 14
    assert np.isfinite(session.reports[-1]["val/AP"])
    meta = json.loads((session.checkpoints[-1] / "meta.json").read_text())
    assert meta["keypoints"] == keypoint_info(ds) and meta["keypoints"]["set"] == "crowdpose"
    # The evaluator the training loop builds (from the val file's path alone) scores with CrowdPose's sigmas.
    evaluator = CocoKeypointEvaluator(ds.ann_file)
    assert evaluator.sigmas.tolist() == list(CROWDPOSE.sigmas)
    assert evaluator.evaluate(perfect_predictions(ds))["AP"] == pytest.approx(1.0)
    check_served_names(session.checkpoints[-1], CROWDPOSE, tmp_path)
    check_served_over_http(session.checkpoints[-1], CROWDPOSE, tmp_path)

    # evaluate CLI: the model's own set; a bare weights file (no set stored) takes the set the file's names are
    # recognised as (same count), or the one --keypoints names.
    common = ["--data-root", str(root), "--ann", "annotations/crowdpose.json", "--images", "images"]
    assert evaluate_cli.main(["--model", str(session.checkpoints[-1]), "--out", str(tmp_path / "e1"), *common]) == 0
    settings = json.loads((tmp_path / "e1/metrics.json").read_text())["settings"]
    assert settings["keypoints"] == "crowdpose" and settings["protocol"] == "crowdpose"
    save_safetensors(trainer.engine.module, tmp_path / "bare.safetensors")
    assert evaluate_cli.main(["--model", str(tmp_path / "bare.safetensors"), "--out", str(tmp_path / "e3"), *common]) == 0
    assert evaluate_cli.main(["--model", str(tmp_path / "bare.safetensors"), "--keypoints", "crowdpose",
                              "--out", str(tmp_path / "e2"), *common]) == 0
    e1, e2, e3 = (json.loads((tmp_path / f"{e}/metrics.json").read_text())["metrics"] for e in ("e1", "e2", "e3"))
    assert json.dumps(e1) == json.dumps(e2) == json.dumps(e3)  # the same weights, scored with the same set
    # The per-epoch validation reports CrowdPose's protocol (this remapped file has no crowd index: no split).
    assert {"val/AP", "val/AR", "val/AP_easy", "val/AP_hard"} <= set(session.reports[-1])


@pytest.mark.slow
def test_wholebody_file_reads_separate_fields_trains_evaluates_and_serves(tmp_path):
    root = wholebody_root(tmp_path)
    raw = json.loads((root / "annotations/wholebody.json").read_text())
    trainer, session = train_tiny(root, "wholebody.json", "coco_wholebody", tmp_path / "run")
    ds = trainer.val_ds
    assert ds.num_keypoints == 133 and trainer.engine.module.spec.num_keypoints == 133
    first = next(a for a in raw["annotations"] if a["id"] == ds.instances[0].ann_id)
    kps = ds.instances[0].keypoints
    for (field, n), start in zip(WHOLEBODY.parts, np.cumsum([0] + [n for _, n in WHOLEBODY.parts]), strict=False):
        assert np.allclose(kps[start:start + n].ravel(), first[field]), field
    assert np.isfinite(session.reports[-1]["val/AP"])
    # COCOeval scores all 133 (fields joined into the ground truth) with COCO-WholeBody's sigmas.
    evaluator = CocoKeypointEvaluator(ds.ann_file)
    assert evaluator.sigmas.tolist() == list(WHOLEBODY.sigmas)
    assert len(evaluator.coco.anns[first["id"]]["keypoints"]) == 3 * 133
    perfect = perfect_predictions(ds)
    assert evaluator.evaluate(perfect)["AP"] == pytest.approx(1.0)
    for p in perfect:
        p["keypoints"][91:, :2] += 25.0  # both hands off by 25 px: the whole-body AP must see it
    assert evaluator.evaluate(perfect)["AP"] < 0.9
    # The per-epoch validation reports COCO-WholeBody's per-part AP.
    assert {"val/AP", "val/body_AP", "val/lefthand_AP", "val/wholebody_AP"} <= set(session.reports[-1])
    check_served_names(session.checkpoints[-1], WHOLEBODY, tmp_path)
    check_served_over_http(session.checkpoints[-1], WHOLEBODY, tmp_path)


# ------------------------------------------------------------------ constants against their sources
# Written out from the published files, not from our constants: mmpose's configs/_base_/datasets/<set>.py
# (keypoint_info swap, skeleton_info, joint_weights, sigmas), pycocotools' cocoeval.py (COCO's sigmas),
# AI Challenger's keypoint_eval.py via mmpose (delta = 2 x sigma), COCO-WholeBody's myeval_wholebody.py.
_COCO_SRC_SIGMAS = [.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89]  # /10
_COCO_SRC_LINKS = [("left_ankle", "left_knee"), ("left_knee", "left_hip"), ("right_ankle", "right_knee"),
                   ("right_knee", "right_hip"), ("left_hip", "right_hip"), ("left_shoulder", "left_hip"),
                   ("right_shoulder", "right_hip"), ("left_shoulder", "right_shoulder"), ("left_shoulder", "left_elbow"),
                   ("right_shoulder", "right_elbow"), ("left_elbow", "left_wrist"), ("right_elbow", "right_wrist"),
                   ("left_eye", "right_eye"), ("nose", "left_eye"), ("nose", "right_eye"), ("left_eye", "left_ear"),
                   ("right_eye", "right_ear"), ("left_ear", "left_shoulder"), ("right_ear", "right_shoulder")]
_SIDES = [("left_" + j, "right_" + j) for j in ("eye", "ear", "shoulder", "elbow", "wrist", "hip", "knee", "ankle")]
_FACE_SWAP = [(0, 16), (1, 15), (2, 14), (3, 13), (4, 12), (5, 11), (6, 10), (7, 9), (17, 26), (18, 25), (19, 24),
              (20, 23), (21, 22), (31, 35), (32, 34), (36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46),
              (48, 54), (49, 53), (50, 52), (55, 59), (56, 58), (60, 64), (61, 63), (65, 67)]
_HAND_SRC = ["thumb", "forefinger", "middle_finger", "ring_finger", "pinky_finger"]
SOURCES = {
    "coco": dict(
        sigmas=[s / 10 for s in _COCO_SRC_SIGMAS],
        joint_weights=[1., 1., 1., 1., 1., 1., 1., 1.2, 1.2, 1.5, 1.5, 1., 1., 1.2, 1.2, 1.5, 1.5],
        swaps=_SIDES, links=_COCO_SRC_LINKS),
    "crowdpose": dict(
        names=["left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip",
               "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle", "top_head", "neck"],
        sigmas=[.079, .079, .072, .072, .062, .062, .107, .107, .087, .087, .089, .089, .079, .079],
        joint_weights=[.2, .2, .2, 1.3, 1.5, .2, 1.3, 1.5, .2, .2, .5, .2, .2, .5],
        swaps=_SIDES[2:], links=[*_COCO_SRC_LINKS[:12], ("top_head", "neck"), ("right_shoulder", "neck"),
                                 ("left_shoulder", "neck")]),
    "mpii": dict(
        names=["right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle", "pelvis", "thorax",
               "upper_neck", "head_top", "right_wrist", "right_elbow", "right_shoulder", "left_shoulder",
               "left_elbow", "left_wrist"],
        sigmas=[.089, .083, .107, .107, .083, .089, .026, .026, .026, .026, .062, .072, .179, .179, .072, .062],
        joint_weights=[1.5, 1.2, 1., 1., 1.2, 1.5, 1., 1., 1., 1., 1.5, 1.2, 1., 1., 1.2, 1.5],
        swaps=_SIDES[2:], links=[
            ("right_ankle", "right_knee"), ("right_knee", "right_hip"), ("right_hip", "pelvis"), ("pelvis", "left_hip"),
            ("left_hip", "left_knee"), ("left_knee", "left_ankle"), ("pelvis", "thorax"), ("thorax", "upper_neck"),
            ("upper_neck", "head_top"), ("upper_neck", "right_shoulder"), ("right_shoulder", "right_elbow"),
            ("right_elbow", "right_wrist"), ("upper_neck", "left_shoulder"), ("left_shoulder", "left_elbow"),
            ("left_elbow", "left_wrist")]),
    "aic": dict(
        names=["right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow", "left_wrist", "right_hip",
               "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle", "head_top", "neck"],
        sigmas=[.01388152, .01515228, .01057665, .01417709, .01497891, .01402144, .03909642, .03686941, .01981803,
                .03843971, .03412318, .02415081, .01291456, .01236173],
        joint_weights=[1., 1.2, 1.5, 1., 1.2, 1.5, 1., 1.2, 1.5, 1., 1.2, 1.5, 1., 1.],
        swaps=_SIDES[2:], links=[
            ("right_wrist", "right_elbow"), ("right_elbow", "right_shoulder"), ("right_shoulder", "neck"),
            ("neck", "left_shoulder"), ("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist"),
            ("right_ankle", "right_knee"), ("right_knee", "right_hip"), ("right_hip", "left_hip"),
            ("left_hip", "left_knee"), ("left_knee", "left_ankle"), ("head_top", "neck"),
            ("right_shoulder", "right_hip"), ("left_shoulder", "left_hip")]),
    "ap10k": dict(
        names=["L_Eye", "R_Eye", "Nose", "Neck", "Root of tail", "L_Shoulder", "L_Elbow", "L_F_Paw", "R_Shoulder",
               "R_Elbow", "R_F_Paw", "L_Hip", "L_Knee", "L_B_Paw", "R_Hip", "R_Knee", "R_B_Paw"],
        # mmpose publishes COCO's list unchanged; its order is COCO's, not AP-10K's (see test below).
        sigmas=[.025, .025, .026, .035, .035, .079, .079, .072, .072, .062, .062, .107, .107, .087, .087, .089, .089],
        joint_weights=[1., 1., 1., 1., 1., 1., 1., 1.2, 1.2, 1.5, 1.5, 1., 1., 1.2, 1.2, 1.5, 1.5],
        swaps=[("L_Eye", "R_Eye"), ("L_Shoulder", "R_Shoulder"), ("L_Elbow", "R_Elbow"), ("L_F_Paw", "R_F_Paw"),
               ("L_Hip", "R_Hip"), ("L_Knee", "R_Knee"), ("L_B_Paw", "R_B_Paw")],
        links=[("L_Eye", "R_Eye"), ("L_Eye", "Nose"), ("R_Eye", "Nose"), ("Nose", "Neck"), ("Neck", "Root of tail"),
               ("Neck", "L_Shoulder"), ("L_Shoulder", "L_Elbow"), ("L_Elbow", "L_F_Paw"), ("Neck", "R_Shoulder"),
               ("R_Shoulder", "R_Elbow"), ("R_Elbow", "R_F_Paw"), ("Root of tail", "L_Hip"), ("L_Hip", "L_Knee"),
               ("L_Knee", "L_B_Paw"), ("Root of tail", "R_Hip"), ("R_Hip", "R_Knee"), ("R_Knee", "R_B_Paw")]),
    "onehand10k": dict(
        names=["wrist", *[f"{f}{j}" for f in _HAND_SRC for j in range(1, 5)]], joint_weights=[1.] * 21, swaps=[],
        links=[link for f in _HAND_SRC for link in [("wrist", f"{f}1")] + [(f"{f}{j}", f"{f}{j + 1}") for j in (1, 2, 3)]]),
    "coco_wholebody": dict(
        sigmas=[
            .026, .025, .025, .035, .035, .079, .079, .072, .072, .062, .062, .107, .107, .087, .087, .089, .089, .068,
            .066, .066, .092, .094, .094, .042, .043, .044, .043, .040, .035, .031, .025, .020, .023, .029, .032, .037,
            .038, .043, .041, .045, .013, .012, .011, .011, .012, .012, .011, .011, .013, .015, .009, .007, .007, .007,
            .012, .009, .008, .016, .010, .017, .011, .009, .011, .009, .007, .013, .008, .011, .012, .010, .034, .008,
            .008, .009, .008, .008, .007, .010, .008, .009, .009, .009, .007, .007, .008, .011, .008, .008, .008, .01,
            .008, .029, .022, .035, .037, .047, .026, .025, .024, .035, .018, .024, .022, .026, .017, .021, .021, .032,
            .02, .019, .022, .031, .029, .022, .035, .037, .047, .026, .025, .024, .035, .018, .024, .022, .026, .017,
            .021, .021, .032, .02, .019, .022, .031],
        joint_weights=[1.] * 133,
        swaps=[*_SIDES, *[(f"left_{t}", f"right_{t}") for t in ("big_toe", "small_toe", "heel", "hand_root")],
               *[(f"left_{f}{j}", f"right_{f}{j}") for f in _HAND_SRC for j in range(1, 5)],
               *[(f"face-{a}", f"face-{b}") for a, b in _FACE_SWAP]],
        links=[*_COCO_SRC_LINKS, *[(f"{s}_ankle", f"{s}_{t}") for s in ("left", "right")
                                   for t in ("big_toe", "small_toe", "heel")],
               *[link for s in ("left", "right") for f in _HAND_SRC
                 for link in [(f"{s}_wrist", f"{s}_{f}1")] + [(f"{s}_{f}{j}", f"{s}_{f}{j + 1}") for j in (1, 2, 3)]]]),
}
# Where we knowingly differ from the source, and why (each asserted below, so the list stays true).
DEVIATIONS = {
    # AP-10K's joints are grouped by side; mmpose's list is COCO's interleaved one: moved to the joints.
    "ap10k": {"sigmas": [.025, .025, .026, .035, .035, .079, .072, .062, .079, .072, .062, .107, .087, .089, .107,
                         .087, .089],
              "joint_weights": [1., 1., 1., 1., 1., 1., 1.2, 1.5, 1., 1.2, 1.5, 1., 1.2, 1.5, 1., 1.2, 1.5]},
    # mmpose gives OneHand10K no sigmas (scored by PCK); COCO-WholeBody's hand sigmas (same 21 points) make OKS work.
    "onehand10k": {"sigmas": SOURCES["coco_wholebody"]["sigmas"][91:112]},
}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_builtin_constants_match_their_published_source(name):
    from vitpose.data.keypoints.names import canonical_list

    s, src = BUILTIN_SETS[name], {**SOURCES[name], **DEVIATIONS.get(name, {})}
    names = src.get("names", list(s.names))
    assert canonical_list(names) == canonical_list(s.names)
    index = {n: i for i, n in enumerate(names)}
    assert list(s.sigmas) == pytest.approx(src["sigmas"], abs=1e-9)
    assert list(s.joint_weights) == pytest.approx(src["joint_weights"], abs=1e-9)
    assert {frozenset(p) for p in s.flip_pairs} == {frozenset((index[a], index[b])) for a, b in src["swaps"]}
    assert {frozenset(p) for p in s.skeleton} == {frozenset((index[a], index[b])) for a, b in src["links"]}


def test_ap10k_sigmas_are_cocos_by_joint_meaning_and_differ_from_mmpose_in_8_places():
    coco = dict(zip(COCO.names, COCO.sigmas, strict=True))
    meaning = {"left_front_paw": "left_wrist", "right_front_paw": "right_wrist", "left_back_paw": "left_ankle",
               "right_back_paw": "right_ankle"}
    ap10k = BUILTIN_SETS["ap10k"]
    for n, v in zip(ap10k.names, ap10k.sigmas, strict=True):
        if n.startswith(("left_", "right_")) and n not in ("left_eye", "right_eye"):
            assert v == coco[meaning.get(n, n)], n
    differ = [i for i, (a, b) in enumerate(zip(ap10k.sigmas, SOURCES["ap10k"]["sigmas"], strict=True)) if a != b]
    assert differ == [6, 7, 8, 9, 12, 13, 14, 15]
