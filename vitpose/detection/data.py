"""Person boxes of a COCO-format file as detector training samples: each image letterboxed into the network's
square input the way ``vitpose.deploy.detector`` feeds an ONNX detector (one ratio, grey 114 around it), with
horizontal flips and zoom-outs (smaller people at random places) for training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitpose.data.files import BadSampleError, load_image, read_json
from vitpose.deploy.detector import paste
from vitpose.detection.model import PERSON_LABEL

MIN_BOX_SIDE = 2.0  # pixels: a box thinner than this after letterboxing teaches nothing


class PersonBoxes(torch.utils.data.Dataset):
    """``(image, target)``: a (3, S, S) float tensor in 0..1 and torchvision's ``{"boxes": (N, 4) x1y1x2y2 in
    input pixels, "labels": (N,)}``; crowd regions and boxes without area are left out."""

    def __init__(self, ann_file: Path, image_dir: Path, size: int, train: bool, flip_prob: float = 0.5,
                 zoom_out_prob: float = 0.5, min_zoom: float = 0.4, seed: int = 0):
        data = read_json(ann_file)
        self.image_dir, self.size, self.train = image_dir, size, train
        self.flip_prob, self.zoom_out_prob, self.min_zoom = flip_prob, zoom_out_prob, min_zoom
        self.images = sorted(data["images"], key=lambda im: im["id"])
        boxes: dict[int, list[list[float]]] = {im["id"]: [] for im in self.images}
        for ann in data.get("annotations", []):
            x, y, w, h = ann["bbox"]
            if not ann.get("iscrowd", 0) and w > 0 and h > 0 and ann["image_id"] in boxes:
                boxes[ann["image_id"]].append([x, y, x + w, y + h])
        self.boxes = {k: np.asarray(v, dtype=np.float32).reshape(-1, 4) for k, v in boxes.items()}
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Each (seed, epoch, image) draws its own augmentation: the same in any loader worker, new each epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        info = self.images[index]
        path = self.image_dir / info["file_name"]
        try:
            image = load_image(path)
        except OSError as err:  # FileNotFoundError included: one line naming the file, not a decoder's traceback
            raise BadSampleError("bad_image", f"{path}: not a readable image ({err}); replace it, or remove image "
                                 f"id {info['id']} and its annotations from the annotation file") from None
        boxes = self.boxes[info["id"]].copy()
        h, w = image.shape[:2]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        ratio, offset = self.size / max(h, w), (0, 0)
        if self.train and rng.random() < self.flip_prob:
            image = image[:, ::-1]
            boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
        if self.train and rng.random() < self.zoom_out_prob:
            ratio *= rng.uniform(self.min_zoom, 1.0)
            room = (self.size - w * ratio, self.size - h * ratio)
            offset = (int(rng.uniform(0, room[0])), int(rng.uniform(0, room[1])))
        canvas, boxes = place(image, boxes, self.size, ratio, offset)
        keep = ((boxes[:, 2:] - boxes[:, :2]) >= MIN_BOX_SIDE).all(axis=1)
        target = {"boxes": torch.from_numpy(boxes[keep]),
                  "labels": torch.full((int(keep.sum()),), PERSON_LABEL, dtype=torch.int64)}
        return torch.from_numpy(canvas).permute(2, 0, 1).div_(255.0), target

    def image_info(self, index: int) -> dict[str, Any]:
        return self.images[index]


def place(image: np.ndarray, boxes: np.ndarray, size: int, ratio: float, offset: tuple[int, int]
          ) -> tuple[np.ndarray, np.ndarray]:
    """``image`` scaled by ``ratio`` onto a grey (size, size) canvas at ``offset`` (x, y); ``boxes`` moved along."""
    x0, y0 = offset
    moved = boxes * ratio + np.array([x0, y0, x0, y0], dtype=np.float32)
    return paste(image, (size, size), ratio, offset), moved.clip(0, size).astype(np.float32)


def collate(batch: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> tuple[list, list]:
    """torchvision detection models take lists: images may differ in size, targets in box count."""
    return [img for img, _ in batch], [t for _, t in batch]
