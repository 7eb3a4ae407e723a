"""The built-in keypoint sets (``data.keypoints``): COCO, CrowdPose, MPII, AI Challenger, COCO-WholeBody,
AP-10K and OneHand10K.

Names, flip pairs, skeletons, joint weights and OKS sigmas are the published ones, as mmpose's dataset meta
files give them (configs/_base_/datasets/<name>.py of open-mmlab/mmpose, which cite each dataset's own
evaluation code for the sigmas); where we differ, the comment at the set says why. Links and pairs are
written by name so that a wrong index cannot slip in; ``KeypointSet`` checks every set when it is made.
"""

from __future__ import annotations

from vitpose.data.keypoints.set import KeypointSet, mirror_pairs, pairs_by_name

# ---- COCO (17) ----------------------------------------------------------------------------------------
COCO_KEYPOINTS = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
    "right_knee", "left_ankle", "right_ankle",
]  # fmt: skip
# 1-based joint index pairs, as in COCO's annotation files.
COCO_SKELETON = [
    [16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9], [8, 10],
    [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7],
]  # fmt: skip
# pycocotools' cocoeval.py (kpt_oks_sigmas), the 17 COCO keypoints in order.
COCO_SIGMAS = (.026, .025, .025, .035, .035, .079, .079, .072, .072, .062, .062, .107, .107, .087, .087, .089, .089)
COCO_JOINT_WEIGHTS = (1., 1., 1., 1., 1., 1., 1., 1.2, 1.2, 1.5, 1.5, 1., 1., 1.2, 1.2, 1.5, 1.5)

COCO = KeypointSet(
    name="coco", names=tuple(COCO_KEYPOINTS), flip_pairs=mirror_pairs(COCO_KEYPOINTS),
    skeleton=tuple((a - 1, b - 1) for a, b in COCO_SKELETON), sigmas=COCO_SIGMAS,
    joint_weights=COCO_JOINT_WEIGHTS, source="COCO 2017 person keypoints; sigmas from pycocotools",
)  # fmt: skip

# ---- CrowdPose (14) -----------------------------------------------------------------------------------
_CROWDPOSE = [
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip",
    "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle", "top_head", "neck",
]  # fmt: skip
_LIMBS = [  # the COCO-style limb links shared by the body sets below
    ("left_ankle", "left_knee"), ("left_knee", "left_hip"), ("right_ankle", "right_knee"),
    ("right_knee", "right_hip"), ("left_hip", "right_hip"), ("left_shoulder", "left_hip"),
    ("right_shoulder", "right_hip"), ("left_shoulder", "right_shoulder"), ("left_shoulder", "left_elbow"),
    ("right_shoulder", "right_elbow"), ("left_elbow", "left_wrist"), ("right_elbow", "right_wrist"),
]  # fmt: skip
CROWDPOSE = KeypointSet(
    name="crowdpose", names=tuple(_CROWDPOSE), flip_pairs=mirror_pairs(_CROWDPOSE),
    skeleton=pairs_by_name(_CROWDPOSE, [*_LIMBS, ("top_head", "neck"), ("right_shoulder", "neck"),
                                        ("left_shoulder", "neck")]),
    # COCO's sigmas for the shared joints, the shoulder's for head and neck (mmpose, after CrowdPose's cocoeval).
    sigmas=(.079, .079, .072, .072, .062, .062, .107, .107, .087, .087, .089, .089, .079, .079),
    # As mmpose publishes them (not symmetric left/right; used only with data.joint_weights=true).
    joint_weights=(.2, .2, .2, 1.3, 1.5, .2, 1.3, 1.5, .2, .2, .5, .2, .2, .5),
    # CrowdPose's own json calls the top of the head "head".
    file_names=tuple(_CROWDPOSE[:12] + ["head", "neck"]),
    source="CrowdPose (Li et al., CVPR 2019)",
)  # fmt: skip

# ---- MPII (16) ----------------------------------------------------------------------------------------
_MPII = [
    "right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle", "pelvis", "thorax",
    "upper_neck", "head_top", "right_wrist", "right_elbow", "right_shoulder", "left_shoulder", "left_elbow",
    "left_wrist",
]  # fmt: skip
MPII = KeypointSet(
    name="mpii", names=tuple(_MPII), flip_pairs=mirror_pairs(_MPII),
    skeleton=pairs_by_name(_MPII, [
        ("right_ankle", "right_knee"), ("right_knee", "right_hip"), ("right_hip", "pelvis"), ("pelvis", "left_hip"),
        ("left_hip", "left_knee"), ("left_knee", "left_ankle"), ("pelvis", "thorax"), ("thorax", "upper_neck"),
        ("upper_neck", "head_top"), ("upper_neck", "right_shoulder"), ("right_shoulder", "right_elbow"),
        ("right_elbow", "right_wrist"), ("upper_neck", "left_shoulder"), ("left_shoulder", "left_elbow"),
        ("left_elbow", "left_wrist")]),
    # MPII is scored by PCKh; these OKS sigmas are mmpose's adaptation of COCO's.
    sigmas=(.089, .083, .107, .107, .083, .089, .026, .026, .026, .026, .062, .072, .179, .179, .072, .062),
    joint_weights=(1.5, 1.2, 1., 1., 1.2, 1.5, 1., 1., 1., 1., 1.5, 1.2, 1., 1., 1.2, 1.5),
    source="MPII Human Pose (Andriluka et al., CVPR 2014)",
)  # fmt: skip

# ---- AI Challenger (14) -------------------------------------------------------------------------------
_AIC = [
    "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow", "left_wrist", "right_hip",
    "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle", "head_top", "neck",
]  # fmt: skip
AIC = KeypointSet(
    name="aic", names=tuple(_AIC), flip_pairs=mirror_pairs(_AIC),
    skeleton=pairs_by_name(_AIC, [
        ("right_wrist", "right_elbow"), ("right_elbow", "right_shoulder"), ("right_shoulder", "neck"),
        ("neck", "left_shoulder"), ("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist"),
        ("right_ankle", "right_knee"), ("right_knee", "right_hip"), ("right_hip", "left_hip"), ("left_hip", "left_knee"),
        ("left_knee", "left_ankle"), ("head_top", "neck"), ("right_shoulder", "right_hip"),
        ("left_shoulder", "left_hip")]),
    # AI Challenger's keypoint_eval.py gives delta = 2 x sigma; these are the sigmas.
    sigmas=(.01388152, .01515228, .01057665, .01417709, .01497891, .01402144, .03909642, .03686941, .01981803,
            .03843971, .03412318, .02415081, .01291456, .01236173),
    joint_weights=(1., 1.2, 1.5, 1., 1.2, 1.5, 1., 1.2, 1.5, 1., 1.2, 1.5, 1., 1.),
    source="AI Challenger 2017 keypoints (Wu et al., 2017)",
)  # fmt: skip

# ---- COCO-WholeBody (133) -----------------------------------------------------------------------------
_FEET = ["left_big_toe", "left_small_toe", "left_heel", "right_big_toe", "right_small_toe", "right_heel"]
_FACE = [f"face-{i}" for i in range(68)]
_FINGERS = [f"{f}{j}" for f in ("thumb", "forefinger", "middle_finger", "ring_finger", "pinky_finger")
            for j in range(1, 5)]  # fmt: skip
_HAND = ["hand_root", *_FINGERS]  # 21, the order of COCO-WholeBody's lefthand_kpts / righthand_kpts
_WHOLEBODY = COCO_KEYPOINTS + _FEET + _FACE + [f"left_{n}" for n in _HAND] + [f"right_{n}" for n in _HAND]
# The 68-point face has no left_/right_ names: its mirror partners (the iBUG 68 layout: jaw, brows, nose,
# eyes, mouth), as mmpose lists them.
_FACE_MIRROR = [
    *[(i, 16 - i) for i in range(8)], *[(17 + i, 26 - i) for i in range(5)], (31, 35), (32, 34),
    (36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46), (48, 54), (49, 53), (50, 52), (55, 59),
    (56, 58), (60, 64), (61, 63), (65, 67),
]  # fmt: skip
_FINGER_LINKS = [
    link for side in ("left", "right") for finger in ("thumb", "forefinger", "middle_finger", "ring_finger",
                                                      "pinky_finger")
    for link in [(f"{side}_wrist", f"{side}_{finger}1")] + [(f"{side}_{finger}{j}", f"{side}_{finger}{j + 1}")
                                                            for j in range(1, 4)]
]  # fmt: skip
# COCO-WholeBody's evaluation (myeval_wholebody.py): body, feet, face, left hand, right hand.
_WHOLEBODY_SIGMAS = (
    .026, .025, .025, .035, .035, .079, .079, .072, .072, .062, .062, .107, .107, .087, .087, .089, .089,
    .068, .066, .066, .092, .094, .094,
    .042, .043, .044, .043, .040, .035, .031, .025, .020, .023, .029, .032, .037, .038, .043, .041, .045, .013,
    .012, .011, .011, .012, .012, .011, .011, .013, .015, .009, .007, .007, .007, .012, .009, .008, .016, .010,
    .017, .011, .009, .011, .009, .007, .013, .008, .011, .012, .010, .034, .008, .008, .009, .008, .008, .007,
    .010, .008, .009, .009, .009, .007, .007, .008, .011, .008, .008, .008, .010, .008,
    .029, .022, .035, .037, .047, .026, .025, .024, .035, .018, .024, .022, .026, .017, .021, .021, .032, .020,
    .019, .022, .031,
    .029, .022, .035, .037, .047, .026, .025, .024, .035, .018, .024, .022, .026, .017, .021, .021, .032, .020,
    .019, .022, .031,
)  # fmt: skip
COCO_WHOLEBODY = KeypointSet(
    name="coco_wholebody", names=tuple(_WHOLEBODY),
    flip_pairs=mirror_pairs(_WHOLEBODY) + tuple((23 + a, 23 + b) for a, b in _FACE_MIRROR),
    skeleton=COCO.skeleton + pairs_by_name(_WHOLEBODY, [
        *[(f"{s}_ankle", f"{s}_{p}") for s in ("left", "right") for p in ("big_toe", "small_toe", "heel")],
        *_FINGER_LINKS]),
    sigmas=_WHOLEBODY_SIGMAS, joint_weights=(),  # mmpose: 1 for all 133
    parts=(("keypoints", 17), ("foot_kpts", 6), ("face_kpts", 68), ("lefthand_kpts", 21), ("righthand_kpts", 21)),
    source="COCO-WholeBody (Jin et al., ECCV 2020); body/foot/face/hand fields of its annotations",
)  # fmt: skip

# ---- AP-10K (17, animals) -----------------------------------------------------------------------------
# AP-10K's json names (snake case); mmpose displays them as L_Eye, R_Eye, Nose, ..., R_B_Paw.
_AP10K = [
    "left_eye", "right_eye", "nose", "neck", "root_of_tail", "left_shoulder", "left_elbow", "left_front_paw",
    "right_shoulder", "right_elbow", "right_front_paw", "left_hip", "left_knee", "left_back_paw", "right_hip",
    "right_knee", "right_back_paw",
]  # fmt: skip
AP10K = KeypointSet(
    name="ap10k", names=tuple(_AP10K), flip_pairs=mirror_pairs(_AP10K),
    skeleton=pairs_by_name(_AP10K, [
        ("left_eye", "right_eye"), ("left_eye", "nose"), ("right_eye", "nose"), ("nose", "neck"),
        ("neck", "root_of_tail"), ("neck", "left_shoulder"), ("left_shoulder", "left_elbow"),
        ("left_elbow", "left_front_paw"), ("neck", "right_shoulder"), ("right_shoulder", "right_elbow"),
        ("right_elbow", "right_front_paw"), ("root_of_tail", "left_hip"), ("left_hip", "left_knee"),
        ("left_knee", "left_back_paw"), ("root_of_tail", "right_hip"), ("right_hip", "right_knee"),
        ("right_knee", "right_back_paw")]),
    # The paper gives none. mmpose's ap10k.py "modified COCO's" but kept COCO's interleaved left/right order
    # while AP-10K groups joints by side (L shoulder, elbow, paw, then R ...): 8 of its 17 values belong to
    # another joint. These are COCO's values moved to the joint they measure (shoulder .079, elbow .072,
    # front paw = wrist .062, hip .107, knee .087, back paw = ankle .089; neck and tail keep mmpose's .035).
    sigmas=(.025, .025, .026, .035, .035, .079, .072, .062, .079, .072, .062, .107, .087, .089, .107, .087, .089),
    # Same fix for the joint weights (mmpose: COCO's list unchanged): elbows/knees 1.2, paws 1.5.
    joint_weights=(1., 1., 1., 1., 1., 1., 1.2, 1.5, 1., 1.2, 1.5, 1., 1.2, 1.5, 1., 1.2, 1.5),
    source="AP-10K (Yu et al., NeurIPS 2021 Datasets and Benchmarks)",
)  # fmt: skip

# ---- OneHand10K (21) ----------------------------------------------------------------------------------
_ONEHAND = ["wrist", *_FINGERS]
ONEHAND10K = KeypointSet(
    name="onehand10k", names=tuple(_ONEHAND),
    flip_pairs=(),  # one hand of either side: a mirrored hand is a hand with the same keypoints
    skeleton=pairs_by_name(_ONEHAND, [
        link for finger in ("thumb", "forefinger", "middle_finger", "ring_finger", "pinky_finger")
        for link in [("wrist", f"{finger}1")] + [(f"{finger}{j}", f"{finger}{j + 1}") for j in range(1, 4)]]),
    # Hand sets are scored by PCK/AUC in mmpose, which gives no sigmas; COCO-WholeBody's hand sigmas (same
    # 21 points, same order) make OKS AP work.
    sigmas=_WHOLEBODY_SIGMAS[91:112], joint_weights=(),
    source="OneHand10K (Wang et al., TCSVT 2018); sigmas: COCO-WholeBody's hand",
)  # fmt: skip

BUILTIN_SETS: dict[str, KeypointSet] = {
    s.name: s for s in (COCO, CROWDPOSE, MPII, AIC, COCO_WHOLEBODY, AP10K, ONEHAND10K)
}
