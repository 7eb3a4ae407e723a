"""int8 ONNX of a ViTPose: static QDQ quantization calibrated on the model's own training crops, the ONNX
network behind ``PosePredictor`` (so onnxruntime heatmaps are decoded by the eager path's code), and the checks
an int8 export must pass (heatmap parity, val AP).

Owns what turns an fp32 export (``vitpose.deploy.onnx``) into an int8 one: which crops calibrate it
(``calibration_crops``: items of the training dataset the model's config builds, augmented as in training;
activation ranges of random tensors are not those of people), the quantizer's recipe (``quantize_int8``,
its levers as arguments for python -m benchmarks.student_latency), and ``OrtNetwork``, an ``nn.Module`` facade over
an onnxruntime session that ``PosePredictor``, the evaluator and the served pyfunc take in place of the eager
network.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitpose.deploy.runtime import INPUT_NAME, OrtNetwork

CALIBRATION_CROPS = 64  # stable MinMax ranges for a small ViT; each costs one fp32 forward
# Quantized: the ops with a weight (linear layers, convolutions), where the time goes. Left in float (see
# `python -m benchmarks.student_latency --levers`): the attention's activation x
# activation MatMuls (quantized, onnxruntime also fuses the Softmax between them into a QLinearSoftmax, 10x
# slower than the float one), ConvTranspose (the CPU provider has no int8 kernel: its Quantize/Dequantize
# pairs only add work; export_onnx writes the head's deconvolutions as Conv + DepthToSpace instead, see
# vitpose.models.subpixel), LayerNorm, GELU and the residual Adds (accuracy, and no faster kernels).
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
# Also quantized where they follow one of those (the sub-pixel head's Conv -> ReLU -> DepthToSpace [-> Slice]):
# the ReLU then disappears into the Conv's int8 output range and the shuffle moves int8 bytes, so the head
# stays int8 from Conv to Conv instead of a Dequantize, float ReLU and shuffle, and a Quantize between them.
PASS_THROUGH_OPS = ("Relu", "DepthToSpace", "Slice")
PRECISION_KEY = "vitpose_precision"  # metadata_props entry an int8 file carries


def calibration_crops(dataset: Any, count: int = CALIBRATION_CROPS, seed: int = 0) -> torch.Tensor:
    """``count`` crops (N, 3, H, W) of ``dataset`` (a ``TopDownCocoDataset``; the training one, augmented as
    in training), drawn without replacement with ``seed``."""
    if len(dataset) == 0:
        raise ValueError(f"{getattr(dataset, 'ann_file', 'the dataset')} has no instances to calibrate on")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    return torch.stack([dataset[i]["image"] for i in order]).float()


class _CropReader:
    """onnxruntime's ``CalibrationDataReader`` protocol over a tensor of crops, ``batch`` at a time."""

    def __init__(self, crops: torch.Tensor, batch: int = 8):
        self._batches = iter([{INPUT_NAME: crops[i : i + batch].numpy()} for i in range(0, len(crops), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_int8(fp32_path: str | Path, out_path: str | Path, crops: torch.Tensor, *, per_channel: bool = False,
                  op_types: Iterable[str] = QUANTIZED_OPS, weights_only: bool = True, preprocess: bool = True,
                  qoperator: bool = False, pass_through: Iterable[str] = PASS_THROUGH_OPS,
                  unsigned_activations: bool = True, int8_matmul_outputs: bool = False, exclude: Iterable[str] = (),
                  extra_options: dict[str, Any] | None = None) -> Path:
    """Static 8-bit quantization (int8 symmetric weights, uint8 asymmetric activations, MinMax ranges from
    ``crops``) of an fp32 ONNX file written by ``export_onnx``; returns ``out_path``, which keeps the file's
    metadata.

    The recipe's levers: ``per_channel`` (one weight scale per output channel; off: measured no faster here),
    ``op_types`` and ``weights_only`` (only nodes of those types whose second input is a stored weight, and the
    ``pass_through`` ops right after them), ``preprocess`` (onnxruntime's ``quant_pre_process``: shape
    inference and fusions first), ``qoperator`` (QLinear* operators in the file instead of QDQ pairs
    onnxruntime fuses at load), ``unsigned_activations`` (off: int8 activations; onnxruntime's x86 kernels are
    u8 x s8 and it converts int8 ones at load, but not where a Quantize feeds a Reshape or Transpose, which left
    the patch embedding and the qkv projections in float; benchmarks/RESULTS.md section 6),
    ``int8_matmul_outputs`` (off: the linear layers' outputs stay float, onnxruntime's MatMulIntegerToFloat;
    what reads them, attention, GELU, the residual Adds, is float, so quantizing them only added a Quantize and
    a Dequantize per layer), ``exclude`` (nodes whose name contains one of these stay float), ``extra_options`` (onnxruntime's
    ``quantize_static`` ones, over ours).
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if len(crops) == 0:
        raise ValueError("no calibration crops; give at least one training crop")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    meta = list(onnx.load(str(fp32_path)).metadata_props)
    with tempfile.TemporaryDirectory() as tmp:
        source = fp32_path
        if preprocess:
            source = Path(tmp) / "pre.onnx"
            quant_pre_process(str(fp32_path), str(source), skip_symbolic_shape=True)
        graph = onnx.load(str(source)).graph
        quantize_static(
            str(source), str(out_path), _CropReader(crops),
            quant_format=QuantFormat.QOperator if qoperator else QuantFormat.QDQ,
            activation_type=QuantType.QUInt8 if unsigned_activations else QuantType.QInt8,
            weight_type=QuantType.QInt8, per_channel=per_channel,
            op_types_to_quantize=[*op_types, *pass_through],
            nodes_to_quantize=_weight_nodes(graph, set(op_types), set(pass_through)) if weights_only else None,
            nodes_to_exclude=[n.name for n in graph.node if any(e in n.name for e in exclude)],
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                           "OpTypesToExcludeOutputQuantization": [] if int8_matmul_outputs else ["MatMul"],
                           **(extra_options or {})},
        )
    proto = onnx.load(str(out_path))
    del proto.metadata_props[:]
    proto.metadata_props.extend(meta)
    entry = proto.metadata_props.add()
    entry.key, entry.value = PRECISION_KEY, ("int8 (static QDQ, int8 weights, uint8 activations, MinMax-calibrated "
                                             "on training crops)" if unsigned_activations else
                                             "int8 (static QDQ, MinMax-calibrated on training crops)")
    onnx.save(proto, str(out_path))
    return out_path


def _weight_nodes(graph: Any, op_types: set[str], pass_through: set[str] = frozenset()) -> list[str]:
    """Names of the ``op_types`` nodes whose second input is a stored weight (an initializer), and of the
    ``pass_through`` nodes fed by one of those."""
    weights = {init.name for init in graph.initializer}
    picked = [n for n in graph.node if n.op_type in op_types and len(n.input) > 1 and n.input[1] in weights]
    made = {o for n in picked for o in n.output}
    for n in graph.node:  # graph order is topological: a chain Conv -> Relu -> DepthToSpace is followed
        if n.op_type in pass_through and n.input and n.input[0] in made:
            picked.append(n)
            made.update(n.output)
    return [n.name for n in picked]


def val_ap(network: torch.nn.Module, meta: dict[str, Any], val_dataset: Any) -> float:
    """COCO keypoint AP of ``network`` (eager or ``OrtNetwork``) on ``val_dataset``, flip test on: the
    evaluate CLI's path (``PosePredictor.predict_dataset`` + ``CocoKeypointEvaluator``)."""
    from vitpose.deploy.inference import PosePredictor
    from vitpose.evaluation import CocoKeypointEvaluator

    preds = PosePredictor(network, meta).predict_dataset(val_dataset)
    return float(CocoKeypointEvaluator(val_dataset.ann_file, keypoints=val_dataset.keypoint_set).evaluate(preds)["AP"])


@torch.inference_mode()
def int8_report(model: torch.nn.Module, meta: dict[str, Any], fp32_path: Path, int8_path: Path, val_dataset: Any,
                parity_crops: int = 16) -> dict[str, float]:
    """What an int8 export is judged by, on ``val_dataset``: max |heatmap| differences fp32 ORT vs eager and
    int8 vs fp32 ORT on its first ``parity_crops`` crops (and the heatmap max, for scale), and the val AP
    of eager, fp32 ORT and int8 ORT."""
    fp32, int8 = OrtNetwork(fp32_path, model.spec), OrtNetwork(int8_path, model.spec)
    crops = torch.stack([val_dataset[i]["image"] for i in range(min(parity_crops, len(val_dataset)))])
    eager_hm, fp32_hm = model(crops), fp32(crops)
    return {
        "heatmap_max": float(eager_hm.abs().max()),
        "fp32_vs_eager_max_abs_diff": float((fp32_hm - eager_hm).abs().max()),
        "int8_vs_fp32_max_abs_diff": float((int8(crops) - fp32_hm).abs().max()),
        "ap_eager": val_ap(model, meta, val_dataset),
        "ap_fp32": val_ap(fp32, meta, val_dataset),
        "ap_int8": val_ap(int8, meta, val_dataset),
    }
