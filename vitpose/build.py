"""Config sections -> the objects a run is made of: the datasets and the model.

Training, distillation, the pipelines and the benchmarks all build through here, so a model or a dataset
built for a sweep's preparation is the one the trainer would have built. Nothing here trains.
"""

from __future__ import annotations

from typing import Any

import torch

from vitpose.config import TrainingConfig


def ensure_data(cfg: TrainingConfig) -> None:
    """Generate the synthetic dataset of ``cfg`` when it is missing or was made with other knobs.

    Only into the default root, a folder that exists, or with ``data.synthetic.generate``: a typo in
    ``data.root`` is an error, not ten epochs on a dataset generated where nobody will look. A multi-dataset
    run ensures each of its datasets; a synthetic one in another keypoint set is remapped (data/remap.py).
    """
    if cfg.data.datasets:
        from vitpose.data.remap import ensure_remapped

        for _, _, one in dataset_configs(cfg):
            ensure_data(one)
            if one.data.kind == "synthetic" and one.data.keypoints != "coco":
                ensure_remapped(one.data.root_path(), one.data.keypoints)
        return
    if cfg.data.kind != "synthetic":
        return
    from vitpose.config import ConfigError, DataConfig
    from vitpose.data.synthetic import SynthConfig, ensure_synthetic_dataset

    s = cfg.data.synthetic
    root = cfg.data.root_path()
    if not root.exists() and cfg.data.root != DataConfig().root and not s.generate:
        raise ConfigError(f"data.root: {root} does not exist; fix the path, or generate the synthetic dataset "
                          f"there with --set data.synthetic.generate=true (default root: {DataConfig().root})")
    knobs = SynthConfig(clutter=s.clutter, max_figures=s.max_figures, occlusion_prob=s.occlusion_prob,
                        pose_variety=s.pose_variety)
    ensure_synthetic_dataset(cfg.data.root_path(), train_instances=s.train_instances,
                             val_instances=s.val_instances, seed=s.seed, cfg=knobs,
                             unlabeled_instances=s.unlabeled_instances)


def build_datasets(cfg: TrainingConfig, is_local_leader: bool) -> tuple[Any, Any]:
    """The (train, val) top-down datasets; the local leader generates synthetic data first if needed, the
    other ranks wait for it. A multi-dataset run (``data.datasets``) gives a ``MixedTrainSet`` and a
    ``MultiValSet`` (data/multi_dataset.py) of each dataset's own pair."""
    import torch.distributed as dist

    from vitpose.data.coco import TopDownCocoDataset
    from vitpose.data.transforms import AugConfig

    if is_local_leader:
        ensure_data(cfg)
    if cfg.data.datasets:
        from vitpose.data.multi_dataset import MixedTrainSet, MultiValSet

        entries = dataset_configs(cfg)
        pairs = [build_datasets(one, is_local_leader=False) for _, _, one in entries]
        names = [n for n, _, _ in entries]
        return (MixedTrainSet(names, [t for t, _ in pairs], [r for _, r, _ in entries]),
                MultiValSet(names, [v for _, v in pairs]))
    if dist.is_initialized():
        dist.barrier()
    root = cfg.data.root_path()
    # The model decides the crop and heatmap sizes (heatmaps are 4x its token grid), the data follows.
    spec = model_spec(cfg)
    # Both files are read with the chosen keypoint set: a file holding other keypoints is refused by name.
    common = dict(input_size=tuple(spec.img_size), heatmap_size=tuple(spec.heatmap_size),
                  on_bad_sample=cfg.data.on_bad_sample, keypoints=cfg.data.keypoint_set(),
                  joint_weights=cfg.data.joint_weights)
    train = TopDownCocoDataset(root / cfg.data.train_ann, root / cfg.data.train_images, train=True,
                               aug=AugConfig(**cfg.data.aug.model_dump()), aug_seed=cfg.train.seed,
                               image_cache_mb=cfg.data.image_cache_mb, **common)
    val = TopDownCocoDataset(
        root / cfg.data.val_ann,
        root / cfg.data.val_images,
        train=False,
        det_file=(root / cfg.data.val_det_file) if cfg.data.val_det_file else None,
        det_score_thr=cfg.data.det_score_thr,
        **common,
    )
    return train, val


def dataset_configs(cfg: TrainingConfig) -> list[tuple[str, float, TrainingConfig]]:
    """(name, normalised ratio, the run's config with that dataset as its data section) per ``data.datasets``
    entry (config_sections.py); the copies have no ``model.moe`` (a single dataset has one expert)."""
    from vitpose.config import DataConfig
    from vitpose.config_sections import resolve_entries

    model = cfg.model.model_copy(update={"moe": None})
    return [(n, r, cfg.model_copy(update={"data": d, "model": model})) for n, r, d in resolve_entries(cfg.data, DataConfig)]


def model_spec(cfg: TrainingConfig) -> Any:
    """The ``ModelSpec`` of ``cfg.model`` (built on the meta device: no memory, no weights)."""
    from vitpose.models import build_model

    return build_model(cfg.model.preset, device="meta", **model_spec_kwargs(cfg)).spec


def model_spec_kwargs(cfg: TrainingConfig) -> dict[str, Any]:
    """Our config's model section as ``build_model`` overrides (None = keep the preset's value)."""
    from vitpose.config import ConfigError
    from vitpose.models.vitpose import PRESETS

    m = cfg.model
    # The keypoint set decides the head's width; model.num_keypoints, when given, must agree with it. Several
    # datasets: one head each, the first (primary) is keypoint_head; model.moe adds one expert each.
    entries = [(n, one.data) for n, _, one in dataset_configs(cfg)] if cfg.data.datasets else []
    data = entries[0][1] if entries else cfg.data
    kset = data.keypoint_set()
    if m.num_keypoints is not None and m.num_keypoints != kset.num_keypoints:
        raise ConfigError(f"model.num_keypoints is {m.num_keypoints} but data.keypoints {data.keypoints!r} has "
                          f"{kset.num_keypoints} keypoints; remove model.num_keypoints (the set decides it)")
    if m.moe is not None and not entries:
        raise ConfigError("model.moe: ViTPose+ has one expert per dataset of data.datasets; list two or more "
                          "datasets there, or remove model.moe")
    kw: dict[str, Any] = {
        "decoder": m.decoder,
        "img_size": tuple(m.img_size) if m.img_size else None,
        "patch_size": m.patch_size,
        "deconv_channels": m.deconv_channels,
        "num_keypoints": kset.num_keypoints,
        "drop_path_rate": m.drop_path_rate,
        "attention": m.attention.model_dump(),
        "datasets": tuple((n, d.keypoint_set().num_keypoints) for n, d in entries) or None,
        "moe_part_features": (m.moe.part_features or PRESETS[m.preset].embed_dim // 4) if m.moe else None,
    }
    return {k: v for k, v in kw.items() if v is not None}


def build_model_from_config(cfg: TrainingConfig, **extra: Any) -> torch.nn.Module:
    """The model of ``cfg.model``, initialised from ``train.seed`` (the same seed, the same initial weights,
    whatever ran before in the process) and then from ``model.init_checkpoint`` when one is given. ``extra``
    goes to ``build_model`` (e.g. knowledge-token slots of a student)."""
    from vitpose.models import create

    init = cfg.model.init_checkpoint  # any format `python -m vitpose.models inspect` reads (MAE, timm, ...)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left where it was
        torch.manual_seed(cfg.train.seed)
        # An init checkpoint's load report rides on the model (init_report) to the Trainer, which logs it.
        model = create(cfg.model.preset, pretrained=init or None, **model_spec_kwargs(cfg), **extra)
    return _finish(cfg, model)


def _finish(cfg: TrainingConfig, model: torch.nn.Module) -> torch.nn.Module:
    """What both builders do last: partial freezing (before any optimizer sees the parameters; the report rides
    on the model as ``freeze_report``, printed like the load report) and activation checkpointing."""
    from vitpose.models import freeze

    f = cfg.model.freeze
    if f.attention or f.mlp or f.embed:
        model.freeze_report = freeze(model, attention=f.attention, mlp=f.mlp, embed=f.embed)
        print(model.freeze_report.summary(), flush=True)
    if cfg.model.activation_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def build_partitioned_model(cfg: TrainingConfig, ds_config: dict[str, Any], rank: int) -> torch.nn.Module:
    """ZeRO-3: the model built already partitioned, so a model larger than one rank's memory fits.

    zero.Init partitions each submodule as soon as it is built, so the model's own initialisation (and an
    init checkpoint) is applied again on gathered parameters, from rank 0.
    """
    import deepspeed

    from vitpose.models import build_model
    from vitpose.models.pretrained import build_overrides, load_pretrained

    init = cfg.model.init_checkpoint
    torch.manual_seed(cfg.train.seed)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = build_model(cfg.model.preset, **model_spec_kwargs(cfg), **(build_overrides(init) if init else {}))
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
        if rank == 0:
            model.init_weights()
            if init:
                model.init_report = load_pretrained(model, init, echo=True)
    return _finish(cfg, model)
