"""Writes tests/data/<set>/: one tiny annotation file per built-in keypoint set, in the layout its publisher
ships (as mmpose's dataset docs describe them), with a few small images; AIC also in its own release's layout. Run once; the output is committed.

    .venv/bin/python tests/data/make_publisher_files.py

Each file keeps its layout's quirks, which is what the tests exercise: CrowdPose has no ``area`` and an
image ``crowdIndex``; AIC names joints ``Right Shoulder``; AP-10K lists 54 species as categories; OneHand10K
has no ``num_keypoints``/``iscrowd``/``area``; MPII is a list of people (``joints``, ``center``, ``scale``);
COCO-WholeBody keeps feet, face and hands in their own fields. People are drawn from a plain body plan in a
box, jittered, so every joint lies inside its image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).parent
RNG = np.random.default_rng(29)

# Joints in a unit box (x right, y down) of a person facing the camera: their left is the image's right.
BODY = {
    "nose": (.5, .08), "left_eye": (.53, .06), "right_eye": (.47, .06), "left_ear": (.56, .08),
    "right_ear": (.44, .08), "left_shoulder": (.65, .22), "right_shoulder": (.35, .22), "left_elbow": (.75, .38),
    "right_elbow": (.25, .38), "left_wrist": (.8, .52), "right_wrist": (.2, .52), "left_hip": (.6, .55),
    "right_hip": (.4, .55), "left_knee": (.62, .75), "right_knee": (.38, .75), "left_ankle": (.63, .94),
    "right_ankle": (.37, .94), "head_top": (.5, .01), "neck": (.5, .18), "upper_neck": (.5, .16),
    "thorax": (.5, .23), "pelvis": (.5, .55), "left_big_toe": (.68, .99), "left_small_toe": (.6, .99),
    "left_heel": (.62, .97), "right_big_toe": (.32, .99), "right_small_toe": (.4, .99), "right_heel": (.38, .97),
}  # fmt: skip
ANIMAL = {
    "left_eye": (.15, .15), "right_eye": (.2, .13), "nose": (.06, .22), "neck": (.3, .3), "root_of_tail": (.88, .3),
    "left_shoulder": (.3, .45), "left_elbow": (.3, .66), "left_front_paw": (.3, .95), "right_shoulder": (.36, .44),
    "right_elbow": (.37, .65), "right_front_paw": (.38, .93), "left_hip": (.8, .45), "left_knee": (.78, .68),
    "left_back_paw": (.8, .95), "right_hip": (.74, .44), "right_knee": (.72, .67), "right_back_paw": (.73, .93),
}  # fmt: skip
COCO17 = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
          "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee",
          "left_ankle", "right_ankle"]  # fmt: skip
LIMBS12 = COCO17[5:]
FINGERS = [f"{f}{j}" for f in ("thumb", "forefinger", "middle_finger", "ring_finger", "pinky_finger") for j in range(1, 5)]
SPECIES = [
    "antelope", "argali sheep", "bison", "buffalo", "cow", "sheep", "arctic fox", "dog", "fox", "wolf", "beaver",
    "alouatta", "monkey", "noisy night monkey", "spider monkey", "uakari", "deer", "moose", "hamster", "elephant",
    "horse", "zebra", "bobcat", "cat", "cheetah", "jaguar", "king cheetah", "leopard", "lion", "panther",
    "snow leopard", "tiger", "giraffe", "hippo", "chimpanzee", "gorilla", "orangutan", "rabbit", "skunk", "mouse",
    "rat", "otter", "weasel", "raccoon", "rhino", "marmot", "squirrel", "pig", "mole", "black bear", "brown bear",
    "panda", "polar bear", "bat",
]  # fmt: skip


def image(path: Path, w: int, h: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, RNG.integers(60, 200))], -1).astype(np.uint8)
    Image.fromarray(rgb).save(path, quality=70)


def place(plan: dict, names: list[str], box: list[float], hidden: tuple[int, ...] = (), occluded: tuple[int, ...] = ()
          ) -> list[float]:
    """Flat x, y, v of ``names`` in ``box``; ``hidden`` joints unlabelled (0, 0, 0), ``occluded`` v=1."""
    x, y, w, h = box
    out: list[float] = []
    for i, n in enumerate(names):
        if i in hidden:
            out += [0, 0, 0]
            continue
        u, v = plan[n]
        px = x + (u + RNG.uniform(-.02, .02)) * w
        py = y + (v + RNG.uniform(-.01, .01)) * h
        out += [round(float(px), 1), round(float(py), 1), 1 if i in occluded else 2]
    return out


def around(cx: float, cy: float, n: int, r: float) -> list[float]:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    rad = r * (0.6 + 0.4 * (np.arange(n) % 3) / 2)
    return np.stack([cx + rad * np.cos(a), cy + rad * np.sin(a), np.full(n, 2.0)], 1).round(1).ravel().tolist()


def hand(cx: float, cy: float, size: float) -> list[float]:
    """21 points: the root, then 4 per finger fanning upwards."""
    pts = [cx, cy, 2.0]
    for f, ang in enumerate(np.linspace(-1.1, 0.9, 5)):
        for j in range(1, 5):
            r = size * (0.25 + 0.18 * j) * (0.8 if f == 0 else 1.0)
            pts += [round(cx + r * np.sin(ang), 1), round(cy - r * np.cos(ang), 1), 2.0]
    return pts


def write(name: str, data) -> None:
    (OUT / name / "annotations").mkdir(parents=True, exist_ok=True)
    path = OUT / name / "annotations" / f"{name}_val.json"
    path.write_text(json.dumps(data, indent=None, separators=(",", ":")) + "\n")


def mpii_gt(people: list[dict], path: Path) -> None:
    """MPII's val ground truth as mmpose ships it beside mpii_val.json (``mpii_gt_val.mat``, from the HRNet
    release): one column per person in the json's order, 1-based pixels, joint names MPII's short ones. The
    head box spans the head: from above head_top to below upper_neck, 0.8 x that segment wide."""
    from scipy.io import savemat

    joints = np.asarray([p["joints"] for p in people], dtype=np.float64)  # N x 16 x 2
    top, neck = joints[:, 9], joints[:, 8]
    length = np.linalg.norm(top - neck, axis=1)[:, None]
    mid = (top + neck) / 2
    half = np.concatenate([0.4 * length, 0.6 * length], axis=1)
    savemat(path, {
        "dataset_joints": np.array([["rank", "rkne", "rhip", "lhip", "lkne", "lank", "pelv", "thrx", "neck", "head",
                                     "rwri", "relb", "rsho", "lsho", "lelb", "lwri"]], dtype=object),
        "jnt_missing": np.asarray([[1 - v for v in p["joints_vis"]] for p in people], dtype=np.float64).T,
        "pos_gt_src": joints.transpose(1, 2, 0),
        "headboxes_src": np.stack([mid - half, mid + half]).transpose(0, 2, 1),
    })


BOXES = [  # per image: (file size, person boxes)
    ((320, 240), [[20, 20, 90, 200], [150, 30, 80, 190]]),
    ((320, 240), [[40, 10, 100, 220], [180, 40, 70, 170], [240, 20, 70, 200]]),
    ((240, 320), [[30, 40, 150, 260]]),
]


def coco_like(names: list[str], files: list[str], cat: dict, *, area: bool, num: bool, crowd_index=None,
              extra=None) -> dict:
    images, anns = [], []
    aid = 1000
    for i, ((w, h), boxes) in enumerate(BOXES):
        im = {"id": 100 + i, "file_name": files[i], "width": w, "height": h}
        if crowd_index is not None:
            im["crowdIndex"] = crowd_index[i]
        images.append(im)
        image(OUT / cat["_set"] / "images" / files[i], w, h)
        for j, box in enumerate(boxes):
            kps = place(BODY if cat["_set"] != "ap10k" else ANIMAL, names, box,
                        hidden=(3,) if j == 1 else (), occluded=(0,) if j == 0 else ())
            ann = {"id": aid, "image_id": 100 + i, "category_id": cat["id"], "bbox": box, "keypoints": kps,
                   "iscrowd": 0}
            if num:
                ann["num_keypoints"] = sum(v > 0 for v in kps[2::3])
            if area:
                ann["area"] = round(box[2] * box[3] * 0.6, 1)
            if extra:
                extra(ann, i, j)
            anns.append(ann)
            aid += 1
    category = {k: v for k, v in cat.items() if not k.startswith("_")}
    return {"images": images, "annotations": anns, "categories": [category]}


def main() -> None:
    # COCO 2017 person keypoints, as annotations/person_keypoints_val2017.json.
    coco = coco_like(COCO17, [f"{n:012d}.jpg" for n in (139, 785, 872)],
                     {"_set": "coco", "supercategory": "person", "id": 1, "name": "person", "keypoints": COCO17,
                      "skeleton": [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8],
                                   [7, 9], [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]},
                     area=True, num=True)
    coco["info"] = {"description": "COCO 2017 Dataset", "version": "1.0", "year": 2017}
    coco["licenses"] = [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "BY-NC-SA"}]
    coco["annotations"].append({"id": 1900, "image_id": 101, "category_id": 1, "iscrowd": 1, "num_keypoints": 0,
                                "area": 900.0, "bbox": [5, 200, 60, 30], "keypoints": [0] * 51,
                                "segmentation": {"counts": [61000, 10, 2000], "size": [240, 320]}})
    write("coco", coco)
    # CrowdPose (Jeff-sjtu/CrowdPose crowdpose_test.json): no 'area'; images carry crowdIndex; 'head' not 'top_head'.
    cp_names = LIMBS12 + ["head", "neck"]
    write("crowdpose", coco_like([*LIMBS12, "head_top", "neck"], [f"{n}.jpg" for n in (100000, 100001, 100002)],
                                 {"_set": "crowdpose", "supercategory": "person", "id": 1, "name": "person",
                                  "keypoints": cp_names, "skeleton": [[16, 14], [14, 12], [17, 15]]},
                                 area=False, num=True, crowd_index=[0.05, 0.47, 0.91]))
    # AI Challenger converted to COCO json (aic_val.json) with the joints named as people write them.
    aic = ["right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow", "left_wrist", "right_hip",
           "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle", "head_top", "neck"]
    spoken = [n.replace("_", " ").title() for n in aic]
    aic_files = [f"{h}.jpg" for h in ("054d9ce9201beffc76e5ff2169d2af2f027002ca",
                                      "0a2d0fbc6cd28b24b7f0fbb36bd5ffdb3de6e5c2", "1f6b7a0b4b7e0a1bd25e5e13f9b3a1c2d3e4f5a6")]
    aic_data = coco_like(aic, aic_files, {"_set": "aic", "supercategory": "person", "id": 1, "name": "person",
                                          "keypoints": spoken}, area=False, num=True)
    write("aic", aic_data)
    # AP-10K (ap10k-val-split1.json): one category per species, all with the same 17 keypoints.
    cats = [{"id": i + 1, "name": s, "supercategory": "animal", "keypoints": list(ANIMAL),
             "skeleton": [[1, 2], [1, 3], [2, 3], [3, 4], [4, 5], [4, 6], [6, 7], [7, 8], [4, 9], [9, 10], [10, 11],
                          [5, 12], [12, 13], [13, 14], [5, 15], [15, 16], [16, 17]]} for i, s in enumerate(SPECIES)]
    species = iter([1, 8, 21, 24, 30, 40])  # antelope, dog, horse, cat, panther, mouse

    def animal(ann, i, j):
        ann["category_id"] = next(species)

    ap = coco_like(list(ANIMAL), [f"{n:012d}.jpg" for n in (1, 2, 3)], {"_set": "ap10k", **cats[0]}, area=True,
                   num=True, extra=animal)
    ap["categories"] = cats
    write("ap10k", ap)
    # COCO-WholeBody (coco_wholebody_val_v1.0.json): body in keypoints, then foot/face/hand fields and boxes.
    feet = ["left_big_toe", "left_small_toe", "left_heel", "right_big_toe", "right_small_toe", "right_heel"]

    def whole(ann, i, j):
        x, y, w, h = ann["bbox"]
        k = ann["keypoints"]
        ann["foot_kpts"] = place(BODY, feet, ann["bbox"])
        ann["face_kpts"] = around(k[0], k[1] + 0.02 * h, 68, 0.05 * w)
        ann["lefthand_kpts"] = hand(k[27], k[28], 0.12 * w) if j != 2 else [0.0] * 63
        ann["righthand_kpts"] = hand(k[30], k[31], 0.12 * w)
        for part in ("face", "lefthand", "righthand"):
            ann[f"{part}_box"] = [x, y, 0.2 * w, 0.2 * h]
            ann[f"{part}_valid"] = any(v > 0 for v in ann[f"{part}_kpts"][2::3])
        ann["foot_valid"] = True
        ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]

    write("coco_wholebody", coco_like(COCO17, [f"{n:012d}.jpg" for n in (139, 785, 872)],
                                      {"_set": "coco_wholebody", "supercategory": "person", "id": 1, "name": "person",
                                       "keypoints": COCO17}, area=True, num=True, extra=whole))
    # OneHand10K (mmpose's onehand10k_test.json): one hand per image, no num_keypoints / iscrowd / area.
    hands = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "hand", "supercategory": "hand",
                                                              "keypoints": ["wrist", *FINGERS]}]}
    for i, (w, h, box) in enumerate([(160, 200, [30, 40, 100, 140]), (200, 160, [50, 20, 110, 130]),
                                     (180, 180, [20, 20, 140, 150])]):
        name = f"Test/source/{i + 1}.jpg"
        image(OUT / "onehand10k" / "images" / name, w, h)
        hands["images"].append({"id": i + 1, "file_name": name, "width": w, "height": h})
        kps = hand(box[0] + box[2] / 2, box[1] + box[3] * 0.95, min(box[2], box[3]) * 0.8)
        hands["annotations"].append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": box, "keypoints": kps})
    write("onehand10k", hands)
    # MPII (mmpose's mpii_val.json): people with joints (1-based pixels), joints_vis, center, scale (/200 px).
    mpii = ["right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle", "pelvis", "thorax",
            "upper_neck", "head_top", "right_wrist", "right_elbow", "right_shoulder", "left_shoulder", "left_elbow",
            "left_wrist"]
    people = []
    for i, ((w, h), boxes) in enumerate(BOXES):
        name = f"{15601864 + i:09d}.jpg"
        image(OUT / "mpii" / "images" / name, w, h)
        for j, (x, y, bw, bh) in enumerate(boxes):
            k = np.asarray(place(BODY, mpii, [x, y, bw, bh], hidden=(0,) if j == 1 else ())).reshape(-1, 3)
            joints = [[round(a + 1, 1), round(b + 1, 1)] if v > 0 else [-1.0, -1.0] for a, b, v in k]
            people.append({"image": name, "joints": joints, "joints_vis": [int(v > 0) for v in k[:, 2]],
                           "center": [round(x + bw / 2 + 1, 1), round(y + bh / 2 + 1 - 0.075 * bh, 1)],
                           "scale": round(bh / 200, 4)})
    write("mpii", people)
    mpii_gt(people, OUT / "mpii" / "annotations" / "mpii_gt_val.mat")
    # AI Challenger's own release (keypoint_validation_annotations_20170911.json): the same people, whole pixels.
    raw = []
    for im in aic_data["images"]:
        people = [a for a in aic_data["annotations"] if a["image_id"] == im["id"]]
        k = {f"human{j + 1}": [v for x, y, s in np.asarray(a["keypoints"]).reshape(-1, 3)
                               for v in (int(round(x)), int(round(y)), {2: 1, 1: 2, 0: 3}[int(s)])]
             for j, a in enumerate(people)}
        boxes = {f"human{j + 1}": [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                 for j, a in enumerate(people)}
        raw.append({"url": f"http://www.sogou.com/{im['id']}", "image_id": Path(im["file_name"]).stem,
                    "keypoint_annotations": k, "human_annotations": boxes})
    (OUT / "aic" / "raw").mkdir(exist_ok=True)
    (OUT / "aic" / "raw" / "keypoint_validation_annotations_20170911.json").write_text(json.dumps(raw) + "\n")

if __name__ == "__main__":
    main()
