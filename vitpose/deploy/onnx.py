"""ONNX export of a ViTPose: the graph (dynamic batch), a parity check against PyTorch in onnxruntime,
and logging the ONNX file to MLflow as the ``onnx`` flavour.

Owns the network-only export: normalised crops ``images`` (N, 3, H, W) float32 in, ``heatmaps``
(N, K, H/4, W/4) out. Cropping, the flip test and decoding stay in Python (``vitpose.deploy.inference``), so the
ONNX file carries the model's ``ModelSpec`` and keypoint metadata (names, flip pairs, skeleton) in its
``metadata_props`` for whoever rebuilds that part in another runtime.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitpose.deploy.runtime import INPUT_NAME, OUTPUT_NAME, onnx_session  # noqa: F401  (one import place for callers)

DEFAULT_OPSET = 17  # LayerNormalization is native from 17; onnxruntime >= 1.14 runs it
# How the head's stride-2 deconvolutions are written into the graph (``vitpose.models.subpixel``):
# "phases_final_grouped" (a 2x2 Conv making the four output phases, then the head's final 1x1 conv on each phase as
# a grouped Conv, DepthToSpace DCR of K channels, a crop: Convs int8 quantization reaches; fp32 and int8 5-12%
# faster than "phases" on the small students), "phases_final" (the same with one dense block-diagonal 1x1: a little
# slower), "phases" (DepthToSpace of the C deconv channels, then the final conv), "conv3x3" (one 3x3 Conv: 10-25%
# slower in fp32, slower in int8 too), "transpose" (ConvTranspose as trained); `python -m
# benchmarks.student_latency --levers` compares them.
DEFAULT_DECONV = "phases_final_grouped"


def export_onnx(model: torch.nn.Module, path: str | Path, *, opset: int = DEFAULT_OPSET,
                meta: dict[str, Any] | None = None, deconv: str = DEFAULT_DECONV) -> Path:
    """Write ``model`` (eval mode, CPU, float32) as ONNX with a dynamic batch axis; returns the path.

    ``deconv``: the form of the head's deconvolutions in the graph (``DEFAULT_DECONV``); every form computes
    the same heatmaps, and ``model`` itself is left as it is.

    Uses the TorchScript-based exporter: the torch.export-based one needs ``onnxscript``, which this project
    does not install. The trace runs at batch 2, not 1, so no size-1 dimension can be mistaken for a
    broadcast and frozen into the graph.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from vitpose.models.subpixel import FORMS, subpixel_copy

    if deconv not in (*FORMS, "transpose"):
        raise ValueError(f"deconv {deconv!r}; choose from {(*FORMS, 'transpose')}")
    model = model.eval().float().cpu()
    has_deconv = any(isinstance(m, torch.nn.ConvTranspose2d) for m in model.modules())
    if deconv != "transpose":
        model = subpixel_copy(model, deconv)
    h, w = model.spec.img_size
    dummy = torch.zeros(2, 3, h, w)
    with warnings.catch_warnings():
        # The exporter's own deprecation notice, and TracerWarnings about the backbone's token-grid check,
        # which is constant for a fixed input size (only the batch is dynamic).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (dummy,), str(path), dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    props = {"vitpose_spec": json.dumps(model.spec.to_dict()), "input": "RGB crops normalised with ImageNet mean/std, "
             "UDP affine of the person box padded 1.25 to the input aspect ratio",
             "vitpose_deconv": deconv if has_deconv else "none"}
    if meta and meta.get("keypoints"):
        kp = meta["keypoints"]
        if len(kp["names"]) != model.spec.num_keypoints:
            raise ValueError(f"the meta names {len(kp['names'])} keypoints but the model predicts "
                             f"{model.spec.num_keypoints}; the meta does not belong to these weights")
        props["vitpose_keypoints"] = json.dumps(kp)
        # The heatmap channels in order, and the set they are (readable without parsing the JSON above).
        props["vitpose_keypoint_names"] = ",".join(kp["names"])
        props["vitpose_keypoint_set"] = str(kp.get("set", "unknown"))
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return path


def sample_crops(batch: int, img_size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Seeded smooth random images, normalised like real crops (white noise would be an atypical input)."""
    import torch.nn.functional as F

    from vitpose.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    g = torch.Generator().manual_seed(seed)
    h, w = img_size
    coarse = torch.rand(batch, 3, max(h // 16, 1), max(w // 16, 1), generator=g)
    rgb = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    rgb = (rgb + 0.1 * torch.rand(batch, 3, h, w, generator=g)).clamp(0, 1)
    mean = torch.as_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.as_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((rgb - mean) / std).float()


@torch.inference_mode()
def check_parity(model: torch.nn.Module, session: Any, batch_sizes: tuple[int, ...] = (1, 4),
                 seed: int = 0) -> dict[int, dict[str, float]]:
    """Same inputs through PyTorch and onnxruntime: per batch size, the max |difference| of the heatmaps and
    the heatmaps' max |value| (for scale)."""
    model = model.eval().float().cpu()
    out = {}
    for i, b in enumerate(batch_sizes):
        x = sample_crops(b, tuple(model.spec.img_size), seed + i)
        ref = model(x).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        if got.shape != ref.shape:
            raise AssertionError(f"onnxruntime output {got.shape} != PyTorch {ref.shape} at batch {b}")
        out[b] = {"max_abs_diff": float(np.abs(got - ref).max()), "max_abs_value": float(np.abs(ref).max())}
    return out


def log_onnx_model(tracking_uri: str, run_id: str, path: str | Path, meta: dict[str, Any],
                   registered_name: str | None = None, alias: str | None = None) -> str | None:
    """Log the ONNX file under ``run_id`` as MLflow's ``onnx`` flavour (tensor in, heatmaps out); register it
    (and point ``alias`` at it) when a name is given. Returns the registered version or None."""
    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from vitpose.deploy.serving import pip_requirements, register_alias
    from vitpose.models import ModelSpec

    spec = ModelSpec.from_dict(meta["spec"])
    (h, w), (hh, hw) = spec.img_size, spec.heatmap_size
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, h, w), INPUT_NAME)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, spec.num_keypoints, hh, hw), OUTPUT_NAME)]),
    )
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.onnx.log_model(
            onnx.load(str(path)), name="onnx", signature=signature, registered_model_name=registered_name,
            metadata={"vitpose": {k: meta[k] for k in ("spec", "keypoints") if k in meta}},
            pip_requirements=pip_requirements(("onnx", "onnxruntime", "mlflow", "numpy")),
        )
    return register_alias(tracking_uri, info, registered_name, alias)
