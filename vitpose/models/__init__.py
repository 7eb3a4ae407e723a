"""ViTPose models: the plain ViT backbone, the heatmap decoders, presets, weight files and optimizer groups.

Every model, fresh or trained, comes from one call, ``create`` (``loading.py``)::

    from vitpose.models import create, param_groups_layer_decay
    model = create("vitpose_b", img_size=(256, 192))                     # a fresh preset
    model = create("vitpose_b", pretrained="mae_pretrain_vit_base.pth")  # started from any weights format
    model = create("vitpose-b.pth")                                      # an official checkpoint, spec inferred
    model = create("models:/vitpose-teacher@current")                    # registered (also runs:/, folders)
    model.meta["keypoints"]["names"]                                     # what its heatmaps are
    groups = param_groups_layer_decay(model, lr=5e-4, weight_decay=0.1)

Loading into a model that already exists (ZeRO-3 builds it partitioned first) is ``weights.load_checkpoint``
(official layout, strict) and ``pretrained.load_pretrained`` (any format, a new head allowed).
"""

from .attention import AttentionSpec
from .backbone import KnowledgeTokens, ViTBackbone, resize_pos_embed
from .formats import FORMATS, VITPOSE_PLUS_EXPERTS
from .freeze import FreezeReport, freeze, frozen_parameter_names
from .heads import ClassicDecoder, SimpleDecoder
from .loading import ModelNotFoundError, create
from .multi_dataset import export_dataset
from .optim import layer_id, param_groups_layer_decay
from .pretrained import inspect_file
from .vitpose import (
    PRESETS,
    ModelSpec,
    ViTPose,
    build_model,
    build_model_from_spec,
    list_presets,
    match_preset,
)
from .weights import (
    CheckpointError,
    CheckpointMismatchError,
    LoadReport,
    UnsafeCheckpointError,
    infer_spec_from_state_dict,
    read_checkpoint,
    save_official,
    save_safetensors,
)

__all__ = [
    "FORMATS",
    "AttentionSpec",
    "FreezeReport",
    "freeze",
    "frozen_parameter_names",
    "PRESETS",
    "VITPOSE_PLUS_EXPERTS",
    "CheckpointError",
    "CheckpointMismatchError",
    "ClassicDecoder",
    "KnowledgeTokens",
    "LoadReport",
    "ModelNotFoundError",
    "ModelSpec",
    "SimpleDecoder",
    "UnsafeCheckpointError",
    "ViTBackbone",
    "ViTPose",
    "build_model",
    "build_model_from_spec",
    "create",
    "export_dataset",
    "infer_spec_from_state_dict",
    "inspect_file",
    "layer_id",
    "list_presets",
    "match_preset",
    "param_groups_layer_decay",
    "read_checkpoint",
    "resize_pos_embed",
    "save_official",
    "save_safetensors",
]
