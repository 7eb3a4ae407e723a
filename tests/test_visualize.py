"""Pictures of predictions: a keypoint the model is unsure of stays visible (faded), and the picture says
which threshold made it so."""

from __future__ import annotations

import numpy as np
from PIL import Image

from vitpose.data.keypoints import default_keypoint_info
from vitpose.visualize import SIDE_COLOURS, draw_persons


def person(confidence: float) -> dict:
    # Two rows of joints across a grey 400x300 image, every joint at the given confidence.
    keypoints = [[40 + 20 * k, 100 + 60 * (k % 2), confidence] for k in range(17)]
    return {"persons": [{"box": [20, 60, 360, 140], "score": 0.5, "box_score": 1.0, "keypoints": keypoints}],
            "whole_image_box": False}


def draw(confidence: float) -> np.ndarray:
    grey = Image.new("RGB", (400, 300), (128, 128, 128))
    return np.asarray(draw_persons(grey, person(confidence), default_keypoint_info(17), score_thr=0.3)).astype(int)


def test_low_confidence_keypoints_are_drawn_faded_not_dropped():
    confident, unsure = draw(0.9), draw(0.1)
    left_eye = (100 + 60, 40 + 20 * 1)  # (y, x) of joint 1, a left joint: blue
    blue = np.array(SIDE_COLOURS["left"])
    grey = np.array([128, 128, 128])
    assert np.abs(confident[left_eye] - blue).max() <= 1  # full colour
    faded = unsure[left_eye]
    # Visible (moved well away from the background) and still blue-ish, but not the full colour.
    assert np.abs(faded - grey).max() > 25 and faded[2] > faded[0]
    assert np.abs(faded - blue).max() > 40


def test_the_picture_states_its_threshold():
    image = draw(0.1)
    legend = image[-14:, :200]  # bottom-left: white text on a black box
    assert (legend.max(axis=2) < 30).mean() > 0.3 and (legend.min(axis=2) > 200).any()
