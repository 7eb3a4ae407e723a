"""Command line for the model package: `python -m vitpose.models summary vitpose_b [--img-size 256 192]
[--attention KIND --window H W] [--compare-attention [--measure]]`, `python -m vitpose.models inspect FILE [--preset P]
[--json]`, `python -m vitpose.models export-dataset MODEL DATASET --out FOLDER` (a multi-dataset model's
single-dataset model: its expert and head, a folder that serving and evaluation load like any model).

Owns nothing but printing: models are built on the meta device, so even ViT-g costs no memory.
"""

from __future__ import annotations

import argparse
import json
import sys

from .attention import KINDS
from .cost import attention_table
from .pretrained import inspect_file
from .vitpose import ViTPose, build_model, list_presets
from .weights import CheckpointError


def summary(model: ViTPose, name: str) -> str:
    spec = model.spec
    grid = model.backbone.grid_size
    head = model.keypoint_head
    gflops_b = model.backbone.flops() / 1e9
    gflops_h = head.flops(grid) / 1e9
    params_b = sum(p.numel() for p in model.backbone.parameters()) / 1e6
    params_h = sum(p.numel() for p in head.parameters()) / 1e6
    decoder = f"classic, {spec.deconv_channels} ch" if spec.decoder == "classic" else "simple"
    rows = [
        (
            "model",
            f"{name}: dim {spec.embed_dim}, depth {spec.depth}, heads {spec.num_heads}, "
            f"mlp {spec.mlp_hidden_dim}, {decoder} decoder",
        ),
        (
            "input (h x w)",
            f"{spec.img_size[0]} x {spec.img_size[1]}, patch {spec.patch_size} (padding {spec.padding})",
        ),
        (
            "token grid",
            f"{grid[0]} x {grid[1]} = {grid[0] * grid[1]} tokens"
            + (f" + {spec.num_knowledge_tokens} knowledge" if spec.num_knowledge_tokens else ""),
        ),
        ("heatmaps", f"{spec.num_keypoints} x {model.heatmap_size[0]} x {model.heatmap_size[1]}"),
        ("attention", spec.attention.describe()),
        ("params backbone", f"{params_b:.2f} M"),
        ("params head", f"{params_h:.2f} M"),
        ("params total", f"{model.num_params() / 1e6:.2f} M"),
        ("GFLOPs backbone", f"{gflops_b:.2f}"),
        ("GFLOPs head", f"{gflops_h:.2f}"),
        (
            "GFLOPs total",
            f"{gflops_b + gflops_h:.2f}  (batch 1; 1 FLOP = 1 multiply-accumulate of "
            "conv/linear/attention, the paper's convention)",
        ),
        ("attention maps", f"{model.backbone.attention_map_bytes() / 2**20:.1f} MB (batch 1, fp32 softmax "
                           "probabilities an explicit attention keeps for backward)"),
    ]
    return "\n".join(f"{k:<16} {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitpose.models")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summary", help="parameters, FLOPs, token grid and heatmap size of a preset")
    s.add_argument("preset", choices=list_presets())
    s.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"))
    s.add_argument("--patch-size", type=int)
    s.add_argument("--decoder", choices=("classic", "simple"))
    s.add_argument("--num-keypoints", type=int)
    s.add_argument("--num-knowledge-tokens", type=int)
    s.add_argument("--attention", choices=KINDS, help="attention kind (default: the preset's, full)")
    s.add_argument("--window", type=int, nargs=2, metavar=("H", "W"), default=(8, 8), help="window in tokens")
    s.add_argument("--compare-attention", action="store_true",
                   help="a table of GFLOPs and memory of every attention kind at this size")
    s.add_argument("--measure", action="store_true", help="with --compare-attention: also measure the activations "
                   "a training forward keeps (builds the model for real: seconds for ViT-B at 576x432)")
    i = sub.add_parser("inspect", help="a weights file's format, the preset it suggests and its load report")
    i.add_argument("file", help="official ViTPose .pth/.safetensors, timm/MAE ViT weights, transformers folder")
    i.add_argument("--preset", choices=list_presets(), help="load into this preset (default: the suggested one)")
    i.add_argument("--expert", type=int, default=0, help="ViTPose+ dataset expert (0 = COCO)")
    i.add_argument("--json", action="store_true", help="end with one JSON line: format, preset, keys")
    e = sub.add_parser("export-dataset", help="one dataset's model (its expert joined, its head) of a multi-dataset "
                       "model, as a folder of model.safetensors + vitpose_meta.json")
    e.add_argument("model", help="models:/NAME@ALIAS, runs:/..., a checkpoint folder or a weights file")
    e.add_argument("dataset", help="the dataset's name (its index also works)")
    e.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    if args.command == "inspect":
        return inspect(args.file, args.preset, args.expert, args.json)
    if args.command == "export-dataset":
        return export_dataset_folder(args.model, args.dataset, args.out)

    overrides = {
        k: v
        for k, v in {
            "img_size": tuple(args.img_size) if args.img_size else None,
            "patch_size": args.patch_size,
            "decoder": args.decoder,
            "num_keypoints": args.num_keypoints,
            "num_knowledge_tokens": args.num_knowledge_tokens,
            "attention": {"kind": args.attention, "window": args.window} if args.attention else None,
        }.items()
        if v is not None
    }
    model = build_model(args.preset, device="meta", **overrides)
    print(summary(model, args.preset))
    if args.compare_attention:
        print()
        print(attention_table(model, tuple(args.window), measure=args.measure))
    return 0


def inspect(path: str, preset: str | None, expert: int, as_json: bool) -> int:
    """Print the load report (the full key lists with --json); a bad file is one `error:` line, exit 2."""
    try:
        report = inspect_file(path, preset, expert)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    print(report.summary())
    if as_json:
        print(json.dumps(report.to_json()))
    return 0


def export_dataset_folder(uri: str, dataset: str, out: str) -> int:
    from pathlib import Path

    from safetensors.torch import save_file

    from .loading import META, WEIGHTS, create
    from .multi_dataset import dataset_meta, export_dataset

    try:
        model = create(uri)
        meta = model.meta
        which: int | str = int(dataset) if dataset.isdigit() else dataset
        single = export_dataset(model, which)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in single.state_dict().items()}, str(folder / WEIGHTS))
    (folder / META).write_text(json.dumps({"spec": single.spec.to_dict(), **dataset_meta(meta, model.spec, which)},
                                          indent=1))
    print(f"wrote {folder / WEIGHTS} ({single.spec.num_keypoints} keypoints) and {folder / META}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
