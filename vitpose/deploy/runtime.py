"""onnxruntime for our ONNX networks: the input/output names every export uses, a CPU session, and
``OrtNetwork``, an ``nn.Module`` facade over a session that ``PosePredictor``, the evaluator and the served
pyfunc take in place of the eager network.

A leaf module (nothing of ours imported): export, quantization and serving all depend on it, and serving
must not import the export code that registers served models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

INPUT_NAME = "images"
OUTPUT_NAME = "heatmaps"


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session with full graph optimisation; ``threads`` defaults to torch's thread count."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    # No busy-waiting between runs: spinning workers take the cores away from whatever runs next in this
    # process (PyTorch, the decode) or beside it, which on a small shared CPU costs more than it saves.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


class OrtNetwork(torch.nn.Module):
    """An ONNX network in onnxruntime, called like the eager model: crops (N, 3, H, W) → heatmaps.

    Carries ``spec`` so ``PosePredictor`` (cropping, flip test, UDP decode), ``predict_dataset`` and the
    served pyfunc use it unchanged; it has no parameters, so their ``.to(device, dtype)`` changes nothing and
    inputs always run as float32 on the CPU.
    """

    def __init__(self, path: str | Path, spec: Any, threads: int | None = None):
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX network not found: {self.path}; export it with pipelines/export.py")
        self.spec = spec
        self.session = onnx_session(self.path, threads)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().float().cpu().numpy()
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0])
