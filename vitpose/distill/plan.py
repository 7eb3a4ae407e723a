"""What a sweep would do, without training a student: ``pipelines/distill.py --plan [--json]``.

Per arm: its trainable parameters, the trainable parameters between the stored knowledge tokens and the
student (0 by construction: tokens enter frozen, with nothing learnable on the way), where the teacher's
heatmaps come from, and what identifies its training views (equal across arms, so arms differ in their loss
only). It reads the registered teacher, so a plan also proves the teacher is there and fits the students.
Per token setting: what the learned tokens do to the frozen teacher's own val loss against the random control
(tokens that do not help the teacher cannot help a student); the plan learns them when no earlier run did, into
the file the sweep then reuses.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict
from typing import Any

import torch

from vitpose.config import ConfigError, StudentConfig
from vitpose.distill.bank import view_stream
from vitpose.distill.space import arm_configs, preparation, searched, trial_preparations, uses_unlabeled
from vitpose.distill.stats import SEED_KEY
from vitpose.distill.student import build_student
from vitpose.distill.teacher import pinned, teacher_identity
from vitpose.distill.tokens import TokenSetting, random_tokens
from vitpose.models import match_preset
from vitpose.run import console


def trainable(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters() if p.requires_grad)


def arm_plan(arm: StudentConfig, teacher_width: int) -> dict[str, Any]:
    """One arm's row of the plan (the student is built as a trial builds it, with tokens of the right shape and
    the feature projector to ``teacher_width`` when the arm distills features)."""
    t, o = arm.distill.token, arm.distill.output
    tokens = None
    if t.enabled:
        tokens = random_tokens(TokenSetting.from_config(arm))  # the stored ones have this shape
    student = build_student(arm, tokens, teacher_width)
    return {
        "trainable_params": trainable(student),
        "token_trainable_params": trainable(student.backbone.knowledge_tokens),
        "tokens": ("random" if t.random else "teacher") if t.enabled else None,
        "teacher_outputs": o.mode if o.enabled else None,
        "output_weight": o.weight if o.enabled else 0.0,
        "feature_weight": arm.distill.feature.weight,
        "second_stage_epochs": arm.distill.second_stage.epochs,
        "views": view_stream(arm),
        "unlabeled_ratio": arm.distill.unlabeled.ratio if uses_unlabeled(arm) else 0.0,
    }


def sweep_plan(cfg: StudentConfig, tracking_uri: str) -> dict[str, Any]:
    from vitpose.distill.teacher import load_teacher

    uri = pinned(cfg.distill.teacher_uri, tracking_uri)
    teacher = load_teacher(cfg, tracking_uri, uri)
    spec, meta = teacher.spec, teacher.meta
    arms = {name: arm_plan(arm, spec.embed_dim) for name, arm in arm_configs(cfg).items()}
    student = next(iter(arm_configs(cfg).values()))
    if student.model.img_size and tuple(student.model.img_size) != tuple(spec.img_size):
        raise ConfigError(f"teacher {cfg.distill.teacher_uri} takes {list(spec.img_size)} crops, model.img_size is "
                          f"{list(student.model.img_size)}; set model.img_size={list(spec.img_size)}")
    preps = [(trial.train.seed, *preparation(trial)) for trial in trial_preparations(cfg)]
    return {
        "teacher": {"uri": cfg.distill.teacher_uri, "preset": match_preset(spec), "embed_dim": spec.embed_dim,
                    "depth": spec.depth, "params": sum(p.numel() for p in teacher.parameters()),
                    "img_size": list(spec.img_size), "keypoints": len((meta.get("keypoints") or {}).get("names") or [])
                    or spec.num_keypoints},
        "arms": arms,
        "prepared_before_trials": {"token_files": len({p[1] for p in preps if p[1]}),
                                   "view_banks": count_banks([p[2] for p in preps if p[2]])},
        "preparations": [{"seed": seed, "token_file": asdict(tokens) if tokens else None,
                          "view_bank": json.loads(bank) if bank else None} for seed, tokens, bank in preps],
        "settings": settings_plan(cfg),
        "token_effects": token_effects(cfg, teacher, teacher_identity(uri, teacher)),
        "unlabeled_set": unlabeled_set(cfg),
        "search_space": cfg.tune.search_space,
        "selection": f"each trial's {cfg.tune.metric} after its last epoch",
    }


def unlabeled_set(cfg: StudentConfig) -> str | None:
    """What the unlabelled set gives the arms that learn from it (its files read as the sweep reads them)."""
    from vitpose.build import build_datasets
    from vitpose.distill.unlabeled import describe, unlabeled_dataset

    trial = next((t for t in trial_preparations(cfg) if uses_unlabeled(t)), None)
    if trial is None:
        return None
    return describe(unlabeled_dataset(trial, build_datasets(trial, is_local_leader=True)[0]))


def token_effects(cfg: StudentConfig, teacher: torch.nn.Module, teacher_id: str) -> list[dict[str, Any]]:
    """Per token setting the sweep learns: the frozen teacher's val loss with the learned tokens against the
    control's random ones. The tokens are learned here when no earlier sweep or plan left them (the sweep then
    reuses the file)."""
    from vitpose.build import build_datasets
    from vitpose.config import resolve_path
    from vitpose.distill.tokens import TOKEN_DIR, ensure_knowledge_tokens, load_tokens, token_effect

    device = "cuda" if torch.cuda.is_available() else "cpu"
    effects: dict[TokenSetting, dict[str, Any]] = {}
    for trial in trial_preparations(cfg):
        setting = preparation(trial)[0]
        if setting is None or setting in effects:
            continue
        train_ds, val_ds = build_datasets(trial, is_local_leader=True)
        path = ensure_knowledge_tokens(teacher, teacher_id, train_ds, setting, resolve_path(TOKEN_DIR), device=device)
        effects[setting] = {"setting": asdict(setting), "file": str(path),
                            **token_effect(teacher, val_ds, setting, load_tokens(path), device=device)}
    return list(effects.values())


def count_banks(streams: list[str]) -> int:
    """View banks the preparations make: one per labelled view stream, one per unlabelled set they add."""
    parsed = [json.loads(s) for s in streams]
    for p in parsed:
        p.pop("features", None)  # a bank that also holds the teacher's tokens is the same bank
    unlabeled = {json.dumps(p.pop("unlabeled"), sort_keys=True) for p in parsed if "unlabeled" in p}
    return len({json.dumps(p, sort_keys=True) for p in parsed}) + len(unlabeled)


def settings_plan(cfg: StudentConfig) -> list[dict[str, Any]]:
    """The settings the sweep compares (the grid's points; keys Tune samples are listed as such), each with the
    seeds it runs with and its number of trials."""
    space = searched(cfg)
    seed_spec = space.pop(SEED_KEY, None)
    seeds = list(seed_spec["grid"]) if seed_spec and "grid" in seed_spec else [cfg.train.seed]
    if seed_spec and "grid" not in seed_spec:
        space[SEED_KEY] = seed_spec  # a sampled seed: part of what Tune samples, not a paired seed
    grid = {k: spec["grid"] for k, spec in space.items() if "grid" in spec}
    sampled = {k: spec for k, spec in space.items() if "grid" not in spec}
    return [{"setting": dict(zip(grid, point, strict=True)), "sampled": sampled, "seeds": seeds,
             "trials": len(seeds) * cfg.tune.num_samples} for point in itertools.product(*grid.values())]


def print_plan(plan: dict[str, Any]) -> None:
    t = plan["teacher"]
    console.say(f"teacher {t['uri']}: {t['preset'] or 'custom'} ({t['params'] / 1e6:.2f}M params, width "
                f"{t['embed_dim']}, input {t['img_size'][0]}x{t['img_size'][1]})")
    for name, arm in plan["arms"].items():
        views = arm["views"]
        console.say(f"  arm {name:<12} trainable {arm['trainable_params']:>9,}  tokens {arm['tokens'] or '-':<7} "
                    f"(trainable on the way in: {arm['token_trainable_params']})  teacher heatmaps "
                    f"{arm['teacher_outputs'] or '-':<6}  views {views['source']} data {views['data']} "
                    f"seed {views['seed']}" + (f"  unlabelled share {arm['unlabeled_ratio']:g}"
                                               if arm["unlabeled_ratio"] else "")
                    + (f"  feature weight {arm['feature_weight']:g}" if arm["feature_weight"] else "")
                    + (f"  second stage: last {arm['second_stage_epochs']} epochs" if arm["second_stage_epochs"] else ""))
    for entry in plan["settings"]:
        label = ", ".join(f"{k}={v}" for k, v in entry["setting"].items()) or "the base config"
        sampled = f", sampling {', '.join(entry['sampled'])}" if entry["sampled"] else ""
        console.say(f"  setting {label}: seeds {entry['seeds']}, {entry['trials']} trial(s){sampled}")
    if plan["unlabeled_set"]:
        console.say(f"  {plan['unlabeled_set']}")
    for e in plan["token_effects"]:
        t = e["setting"]
        console.say(f"  learned tokens (K={t['num_tokens']}, {t['epochs']} epoch(s), lr {t['lr']:g}, seed {t['seed']}): "
                    f"the frozen teacher's val loss {e['learned']:.6f} vs {e['random']:.6f} with the random control "
                    f"({e['change']:+.2%})")
    p = plan["prepared_before_trials"]
    console.say(f"before the trials: {p['token_files']} token file(s), {p['view_banks']} view bank(s) "
                f"(seeds {sorted({e['seed'] for e in plan['preparations']})}); selection: {plan['selection']}")
