"""Top-down person instances from a COCO keypoint file: image decoding, augmentation, items; the index of
instances (categories, boxes, validation) is built by ``vitpose.data.annotations``.

``TopDownCocoDataset`` turns a keypoint annotation file (COCO json, any built-in set's file as its publisher
ships it: ``vitpose.data.keypoints.layouts``, or ``vitpose.data.synthetic``) into one item per person instance, with boxes from the ground truth or from a detector's COCO results
file. Keypoints are those of the chosen keypoint set (``data.keypoints``; a file listing others is refused
naming both) or, without one, of the built-in set the file's names match, else of the file's own entry. Training items are augmented with replayable ``AugParams`` (see ``vitpose.data.transforms``);
evaluation items use the deterministic crop. Bad input is either a ``BadSampleError`` naming the file, the
annotation and the fix (``on_bad_sample='error'``) or skipped and counted (``'skip'``).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import UnidentifiedImageError

from vitpose.data.annotations import AnnotationIndex, Instance
from vitpose.data.codec import encode
from vitpose.data.files import BadSampleError, load_image
from vitpose.data.keypoints.layouts import load_keypoint_file
from vitpose.data.keypoints.set import KeypointSet
from vitpose.data.transforms import (
    IDENTITY,
    AugConfig,
    AugParams,
    Photometric,
    apply_aug,
    normalize,
    sample_aug_params,
)

log = logging.getLogger(__name__)

ITEM_KEYS = (
    "image", "target", "target_weight", "keypoints", "center", "scale", "rotation", "flipped",
    "aug_params", "image_id", "ann_id", "category_id", "bbox_score", "area", "index", "skipped",
)  # fmt: skip


class TopDownCocoDataset(AnnotationIndex, torch.utils.data.Dataset):
    """One item per person instance of a COCO keypoint file (see module docstring).

    Args:
        ann_file: COCO keypoint json (``images``, ``annotations``, ``categories`` with ``keypoints``).
        image_dir: folder the images' ``file_name`` is relative to.
        input_size: network input (h, w). Crops keep its aspect ratio.
        heatmap_size: (h, w); default ``input_size / 4``.
        train: augment (``aug``) and skip crowd / keypoint-less instances. Evaluation items use the plain
            crop; with ground-truth boxes they also skip keypoint-less instances (mmpose does the same, and
            COCOeval ignores those people).
        aug: augmentation knobs for training; ``AugConfig()`` when None.
        aug_seed: None draws fresh augmentation every time; an int makes view ``(index, epoch)`` a fixed
            function of ``(aug_seed, epoch, index)`` (see ``set_epoch``).
        det_file: COCO results json of person detections; boxes come from it instead of the ground truth.
        det_score_thr: keep detections with ``score >= det_score_thr``.
        on_bad_sample: ``'error'`` raises ``BadSampleError``; ``'skip'`` drops the sample and counts it in
            ``bad_sample_counts`` by reason.
        sigma: Gaussian sigma of the target heatmaps (heatmap pixels).
        padding: box padding factor (1.25 like mmpose).
        keypoints: the keypoint set the file must hold (``data.keypoints``); None: see the module docstring.
        joint_weights: multiply each joint's target weight by the set's joint weight (``data.joint_weights``).
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        image_dir: str | os.PathLike,
        *,
        input_size: tuple[int, int] = (256, 192),
        heatmap_size: tuple[int, int] | None = None,
        train: bool,
        aug: AugConfig | None = None,
        aug_seed: int | None = None,
        det_file: str | os.PathLike | None = None,
        det_score_thr: float = 0.0,
        on_bad_sample: Literal["error", "skip"] = "error",
        sigma: float = 2.0,
        padding: float = 1.25,
        image_cache_mb: float = 0.0,
        keypoints: KeypointSet | None = None,
        joint_weights: bool = False,
    ):
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        if train and det_file is not None:
            raise ValueError("det_file gives boxes without keypoints and cannot be used with train=True")
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.det_file = Path(det_file) if det_file is not None else None
        if not self.ann_file.is_file():
            raise FileNotFoundError(
                f"annotation file not found: {self.ann_file} (check the data root / ann_file)"
            )
        if not self.image_dir.is_dir():
            raise FileNotFoundError(
                f"image folder not found: {self.image_dir} (check the data root / image_dir)"
            )
        if self.det_file is not None and not self.det_file.is_file():
            raise FileNotFoundError(f"detection file not found: {self.det_file} (check det_file)")

        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.heatmap_size = (
            (self.input_size[0] // 4, self.input_size[1] // 4) if heatmap_size is None
            else (int(heatmap_size[0]), int(heatmap_size[1]))
        )  # fmt: skip
        self.aspect_ratio = self.input_size[1] / self.input_size[0]
        self.train = train
        self.aug = aug if aug is not None else AugConfig()
        self.aug_seed = aug_seed
        self.epoch = 0
        self.on_bad_sample = on_bad_sample
        self.sigma = sigma
        self.padding = padding
        self.bad_sample_counts: Counter[str] = Counter()
        self.filtered_counts: Counter[str] = Counter()  # crowd / no keypoints: expected, not bad
        self._bad_indices: dict[int, str] = {}  # instance index -> reason, found while loading
        # Decoded images kept in this process (each DataLoader worker has its own) until the budget is
        # spent; first come, first kept, so nothing is evicted and re-decoded. Decoding was a third of
        # a training item's cost on the synthetic set, whose images all fit.
        self._image_cache: dict[str, np.ndarray] = {}
        self._image_cache_left = int(image_cache_mb * 2**20)
        self._photometric = Photometric(self.aug) if train and self.aug.photometric_prob > 0 else None

        self.instances: list[Instance] = self._index(keypoints, det_score_thr)
        self._joint_weights = (np.asarray(self.keypoint_set.joint_weights, np.float32) if joint_weights
                               else None)
        # Bad samples found while indexing; the same in every process that builds this dataset, unlike
        # bad_sample_counts, which also grows as this process meets unreadable images.
        self.index_bad_counts: dict[str, int] = dict(self.bad_sample_counts)
        if self.filtered_counts:
            log.info("%s: filtered %s", self.ann_file.name, dict(self.filtered_counts))
        if self.bad_sample_counts:
            log.warning("%s: skipped bad samples %s", self.ann_file.name, dict(self.bad_sample_counts))
        if not self.instances:
            raise ValueError(
                f"no usable person instances in {self.ann_file}"
                + (f" with detections {self.det_file} (score >= {det_score_thr})" if self.det_file else "")
                + f"; filtered {dict(self.filtered_counts)}, bad {dict(self.bad_sample_counts)}"
            )

    def _index(self, keypoints: KeypointSet | None, det_score_thr: float) -> list[Instance]:
        """The person instances of ``ann_file`` (boxes from ``det_file`` when given); sets the keypoint set."""
        data = load_keypoint_file(self.ann_file)  # publishers' layouts, missing fields derived
        self._read_categories(data, keypoints)
        images = {int(im["id"]): im for im in data.get("images", [])}
        if self.det_file is None:
            return self._gt_instances(data, images)
        return self._det_instances(images, det_score_thr)

    # ----------------------------------------------------------------------------------------- items
    def __len__(self) -> int:
        return len(self.instances)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` when ``aug_seed`` is set (call before each epoch;
        with ``persistent_workers`` the workers keep the epoch they were started with)."""
        self.epoch = int(epoch)

    def sample_params(self, index: int, rng: np.random.Generator | None = None) -> AugParams:
        """Draw the augmentation of one view of instance ``index`` (identity when not training)."""
        if not self.train:
            return IDENTITY
        if rng is None:
            rng = (
                np.random.default_rng() if self.aug_seed is None
                else np.random.default_rng([self.aug_seed, self.epoch, index])
            )  # fmt: skip
        inst = self.instances[index]
        return sample_aug_params(
            rng, inst.keypoints[:, :2], inst.keypoints[:, 2], self.aug,
            upper_body_ids=self.upper_body_ids, aspect_ratio=self.aspect_ratio,
        )  # fmt: skip

    def read_image(self, index: int) -> np.ndarray:
        """Decoded RGB image of instance ``index``; ``BadSampleError`` when it cannot be used."""
        inst = self.instances[index]
        cached = self._image_cache.get(inst.file_name)
        if cached is not None:
            return cached
        path = self.image_dir / inst.file_name
        where = f"image {path} (image id {inst.image_id}, annotation id {inst.ann_id})"
        try:
            image = load_image(path)
        except FileNotFoundError as e:
            raise BadSampleError(
                "missing_image", f"{where} not found; restore it{self._skip_hint()}"
            ) from e
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise BadSampleError(
                "unreadable_image",
                f"{where} cannot be decoded ({e}); replace the file{self._skip_hint()}",
            ) from e
        if inst.width and inst.height and image.shape[:2] != (inst.height, inst.width):
            raise BadSampleError(
                "image_size_mismatch",
                f"{where} decodes to {image.shape[1]}x{image.shape[0]} (after EXIF rotation) but the json says "
                f"{inst.width}x{inst.height}; fix 'width'/'height' or the file{self._skip_hint()}",
            )
        if image.nbytes <= self._image_cache_left:
            image.setflags(write=False)  # shared by every later view of this image: no in-place edits
            self._image_cache[inst.file_name] = image
            self._image_cache_left -= image.nbytes
        return image

    def load(self, index: int, params: AugParams | None = None) -> dict[str, Any]:
        """The item of instance ``index`` under explicit augmentation ``params`` (replay), no substitution.

        ``params=None`` means identity. Raises ``BadSampleError`` for an unusable image.
        """
        params = IDENTITY if params is None else params
        inst = self.instances[index]
        image = self.read_image(index)
        crop, kps, center, scale, _ = apply_aug(
            image, inst.keypoints, inst.center, inst.scale, params, self.input_size, self.flip_pairs,
            self._photometric,
        )  # fmt: skip
        target, weight = encode(kps[:, :2], kps[:, 2], self.input_size, self.heatmap_size, self.sigma)
        if self._joint_weights is not None:
            weight = weight * self._joint_weights
        return {
            "image": torch.from_numpy(normalize(crop)),
            "target": torch.from_numpy(target),
            "target_weight": torch.from_numpy(weight),
            "keypoints": kps.astype(np.float32),  # (K, 3) in input-crop pixels, visibility in column 2
            "center": center.astype(np.float32),
            "scale": scale.astype(np.float32),
            "rotation": np.float32(params.rotation),
            "flipped": bool(params.flip),
            "aug_params": params.to_array(),
            "image_id": int(inst.image_id),
            "ann_id": int(inst.ann_id),
            "category_id": int(inst.category_id),  # AP-10K: each animal's species, carried to its prediction
            "bbox_score": np.float32(inst.bbox_score),
            "area": np.float32(inst.area),
            "index": int(index),
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        """A training view (fresh or seeded ``AugParams``) or the evaluation crop of instance ``index``.

        With ``on_bad_sample='skip'`` an unreadable image is replaced by the next usable instance (in index
        order, so the substitute is deterministic); ``item['index']`` tells which instance was returned.
        """
        n = len(self.instances)
        skipped = []
        for step in range(n):
            i = (index + step) % n
            if i in self._bad_indices:
                skipped.append(f"{i}:{self._bad_indices[i]}")
                continue
            try:
                item = self.load(i, self.sample_params(i))
            except BadSampleError as e:
                if self.on_bad_sample == "error":
                    raise
                # Counted once per instance (per process: DataLoader workers keep their own counts).
                self._bad_indices[i] = e.reason
                self.bad_sample_counts[e.reason] += 1
                skipped.append(f"{i}:{e.reason}")
                log.warning("skipping bad sample: %s", e)
                continue
            # What was skipped to get here ("index:reason,..."), so a trainer can count bad samples
            # exactly even when they were met in DataLoader worker processes or on other ranks.
            item["skipped"] = ",".join(skipped)
            return item
        raise BadSampleError("no_usable_sample", f"every instance of {self.ann_file} failed to load")
