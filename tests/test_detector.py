"""ONNX person detectors in the layouts their publishers ship (mmdeploy's end2end files that rtmlib downloads,
ultralytics exports with and without NMS): files with those inputs and outputs, whose detections are known, must
come back as the right boxes in image pixels after the letterbox is undone."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vitpose.deploy.detector import (
    RTMDET_MEAN_BGR,
    RTMDET_STD_BGR,
    DetectorFormatError,
    OnnxPersonDetector,
    letterbox,
)

IMAGE_HW = (480, 320)  # a portrait frame: letterboxed into 640x640 at ratio 4/3


def fixed_output_model(path, input_name: str, size: int, outputs: dict[str, np.ndarray]) -> None:
    """An ONNX file with the publisher's input and outputs, answering ``outputs`` whatever the image."""
    nodes, infos = [], []
    for name, value in outputs.items():
        nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name + "_value")))
        dtype = TensorProto.INT64 if value.dtype == np.int64 else TensorProto.FLOAT
        infos.append(helper.make_tensor_value_info(name, dtype, list(value.shape)))
    graph = helper.make_graph(nodes, "detector", [helper.make_tensor_value_info(
        input_name, TensorProto.FLOAT, [1, 3, size, size])], infos)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def to_network(xyxy, centred: bool) -> np.ndarray:
    """Image-pixel boxes where the detector sees them: scaled by 640/480, shifted by the centring pad."""
    ratio = 640 / 480
    out = np.asarray(xyxy, dtype=np.float32) * ratio
    if centred:
        out[:, [0, 2]] += (640 - round(320 * ratio)) // 2
    return out


PEOPLE = np.array([[40.0, 60.0, 140.0, 400.0], [180.0, 100.0, 300.0, 460.0]])  # x1, y1, x2, y2 in the frame


def test_ultralytics_raw_output_is_decoded_suppressed_and_mapped_back(tmp_path):
    net = to_network(PEOPLE, centred=True)
    rows = [(*b, 0.9, 0.0) for b in net] + [(*(net[0] + 3), 0.8, 0.0),  # a duplicate of person 0: suppressed
                                            (*net[1], 0.0, 0.95),  # another class there: not a person
                                            (10, 10, 60, 60, 0.1, 0.0)]  # below the score threshold
    anchors = np.zeros((1, 6, 32), dtype=np.float32)  # 4 box + 2 classes, 32 anchors, most of them empty
    for i, (x1, y1, x2, y2, person, other) in enumerate(rows):
        anchors[0, :, i] = [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, person, other]
    fixed_output_model(tmp_path / "yolo11n.onnx", "images", 640, {"output0": anchors})
    boxes = OnnxPersonDetector(tmp_path / "yolo11n.onnx")(np.zeros((*IMAGE_HW, 3), np.uint8))
    assert boxes.shape == (2, 5) and np.allclose(boxes[:, 4], 0.9)
    np.testing.assert_allclose(boxes[:, :4], np.c_[PEOPLE[:, :2], PEOPLE[:, 2:] - PEOPLE[:, :2]], atol=0.5)


def test_ultralytics_end2end_rows_are_filtered_by_score_and_class(tmp_path):
    net = to_network(PEOPLE, centred=True)
    rows = np.zeros((1, 300, 6), dtype=np.float32)  # zero-padded to max_det, as export(nms=True) writes
    rows[0, 0] = [*net[1], 0.7, 0]
    rows[0, 1] = [*net[0], 0.6, 0]
    rows[0, 2] = [*net[0], 0.9, 2]  # a car
    fixed_output_model(tmp_path / "yolo26n.onnx", "images", 640, {"output0": rows})
    boxes = OnnxPersonDetector(tmp_path / "yolo26n.onnx", score_thr=0.5)(np.zeros((*IMAGE_HW, 3), np.uint8))
    np.testing.assert_allclose(boxes[:, 4], [0.7, 0.6])
    np.testing.assert_allclose(boxes[:, :2], PEOPLE[[1, 0], :2], atol=0.5)


@pytest.mark.parametrize("fmt", ["yolox", "rtmdet"])
def test_mmdeploy_end2end_files_as_rtmlib_downloads_them(tmp_path, fmt):
    net = to_network(PEOPLE, centred=False)  # mmdeploy pads at the bottom and right
    dets = np.array([[[*net[0], 0.85], [*net[1], 0.75], [0, 0, 50, 50, 0.9]]], dtype=np.float32)
    labels = np.array([[0, 0, 5]], dtype=np.int64)  # the third is a bus
    fixed_output_model(tmp_path / "end2end.onnx", "input", 640, {"dets": dets, "labels": labels})
    detector = OnnxPersonDetector(tmp_path / "end2end.onnx", format=fmt)
    boxes = detector(np.zeros((*IMAGE_HW, 3), np.uint8))
    np.testing.assert_allclose(boxes[:, :2], PEOPLE[:, :2], atol=0.5)
    np.testing.assert_allclose(boxes[:, 4], [0.85, 0.75])
    # What the network is fed: BGR, top-left, grey 114 around; RTMDet's normalised by mmdet's BGR mean and std.
    frame = np.zeros((*IMAGE_HW, 3), np.uint8)
    frame[..., 0] = 200  # red
    x, box = detector._input(frame)
    bgr = np.array([0.0, 0.0, 200.0], dtype=np.float32)
    expect = (bgr - RTMDET_MEAN_BGR) / RTMDET_STD_BGR if fmt == "rtmdet" else bgr
    np.testing.assert_allclose(x[0, :, 10, 10], expect, rtol=1e-5)
    pad = np.full(3, 114.0, np.float32)
    np.testing.assert_allclose(x[0, :, 10, 600], (pad - RTMDET_MEAN_BGR) / RTMDET_STD_BGR if fmt == "rtmdet" else pad,
                               rtol=1e-5)
    assert box.offset == (0.0, 0.0)
    with pytest.raises(DetectorFormatError, match="say which model it is, format 'yolox' or 'rtmdet'"):
        OnnxPersonDetector(tmp_path / "end2end.onnx")


def test_files_that_are_no_known_detector_are_refused_by_name(tmp_path):
    fixed_output_model(tmp_path / "pose.onnx", "input", 64, {"heatmaps": np.zeros((1, 17, 16, 16), np.float32)})
    with pytest.raises(DetectorFormatError, match="pose.onnx: outputs heatmaps \\[1, 17, 16, 16\\] are not the 'yolox'"):
        OnnxPersonDetector(tmp_path / "pose.onnx", format="yolox")
    (tmp_path / "notes.onnx").write_text("not a model")
    with pytest.raises(DetectorFormatError, match="notes.onnx: not a readable ONNX model"):
        OnnxPersonDetector(tmp_path / "notes.onnx")
    with pytest.raises(FileNotFoundError, match="nowhere.onnx: no detector file there"):
        OnnxPersonDetector(tmp_path / "nowhere.onnx")
    with pytest.raises(DetectorFormatError, match="choose one of auto, yolox, rtmdet, ultralytics"):
        OnnxPersonDetector(tmp_path / "pose.onnx", format="detr")


def test_letterbox_puts_the_image_where_the_format_expects_it():
    image = np.full((100, 200, 3), 7, np.uint8)
    canvas, box = letterbox(image, (64, 64), centred=True)
    assert box.ratio == pytest.approx(0.32) and box.offset == (0.0, 16.0)
    assert canvas[0, 0, 0] == 114 and canvas[32, 32, 0] == 7 and canvas[63, 0, 0] == 114
