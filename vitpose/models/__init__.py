"""ViTPose models: the plain ViT backbone, the heatmap decoders, presets, checkpoints and optimizer groups.

Typical use::

    from vitpose.models import build_model, load_checkpoint, param_groups_layer_decay
    model = build_model("vitpose_b", img_size=(256, 192))
    load_checkpoint(model, "vitpose-b.pth")              # official mmpose layout
    load_pretrained(model, "mae_pretrain_vit_base.pth")  # any format: MAE, timm, DINOv2, CLIP, transformers
    groups = param_groups_layer_decay(model, lr=5e-4, weight_decay=0.1)
"""

from .attention import AttentionSpec
from .backbone import KnowledgeTokens, ViTBackbone, resize_pos_embed
from .formats import FORMATS, VITPOSE_PLUS_EXPERTS
from .freeze import FreezeReport, freeze, frozen_parameter_names
from .heads import ClassicDecoder, SimpleDecoder
from .multi_dataset import export_dataset
from .optim import layer_id, param_groups_layer_decay
from .pretrained import build_overrides, inspect_file, load_pretrained
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
    load_checkpoint,
    load_model,
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
    "ModelSpec",
    "SimpleDecoder",
    "UnsafeCheckpointError",
    "ViTBackbone",
    "ViTPose",
    "build_model",
    "build_model_from_spec",
    "build_overrides",
    "export_dataset",
    "infer_spec_from_state_dict",
    "inspect_file",
    "layer_id",
    "list_presets",
    "load_checkpoint",
    "load_model",
    "load_pretrained",
    "match_preset",
    "param_groups_layer_decay",
    "read_checkpoint",
    "resize_pos_embed",
    "save_official",
    "save_safetensors",
]
