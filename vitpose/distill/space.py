"""The sweep's search space: ``tune.search_space`` from the config -> Tune's param_space, and back from a
trial's sampled values to a validated config. ``distill.parts`` is a virtual key naming the paper's
ablation arms (which distillation parts are on) and the unlabeled arm beyond it; every other key is a dotted
config key.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from vitpose.config import ConfigError, StudentConfig
from vitpose.distill.bank import view_stream
from vitpose.distill.stats import SEED_KEY
from vitpose.distill.tokens import TokenSetting

# Arm -> (tokens: None | "teacher" | "random", output distillation on, unlabeled crops on). random_token is the
# control of token: the same K frozen tokens at the initialisation token learning starts from, never trained on
# the teacher. unlabeled is output distillation plus the teacher-labelled crops of distill.unlabeled; every other
# arm trains on the labelled crops alone.
PARTS = {"none": (None, False, False), "token": ("teacher", False, False), "random_token": ("random", False, False),
         "output": (None, True, False), "both": ("teacher", True, False), "unlabeled": (None, True, True)}
ARMS = list(PARTS)
# A virtual key: which distillation parts are on, as the paper's ablation names them (plus the control).
PARTS_KEY = "distill.parts"


def searched(cfg: StudentConfig) -> dict[str, dict[str, list[Any]]]:
    """``tune.search_space`` with the seeds of ``tune.seeds`` as a grid of ``train.seed`` (every setting runs
    with the same seeds: train.seed, train.seed + 1, ...)."""
    space = dict(cfg.tune.search_space)
    if cfg.tune.seeds > 1:
        if SEED_KEY in space:
            raise ConfigError(f"tune.seeds={cfg.tune.seeds} and tune.search_space.{SEED_KEY} both choose seeds; "
                              f"keep one (tune.seeds runs every setting with the same {cfg.tune.seeds} seeds)")
        space[SEED_KEY] = {"grid": [cfg.train.seed + i for i in range(cfg.tune.seeds)]}
    return space


def search_space(cfg: StudentConfig) -> dict[str, Any]:
    """Tune's param_space from ``tune.search_space`` ({"grid"|"choice"|"uniform"|"loguniform": [...]}) and
    ``tune.seeds``."""
    from ray import tune

    space = searched(cfg)
    if not space:
        raise ConfigError("tune.search_space is empty: give at least one key, e.g. "
                          "{distill.parts: {grid: [none, token, random_token, output, both]}}")
    out: dict[str, Any] = {}
    for key, spec in space.items():
        if len(spec) != 1:
            raise ConfigError(f"tune.search_space.{key}: give exactly one of grid/choice/uniform/loguniform")
        kind, values = next(iter(spec.items()))
        if not values:
            raise ConfigError(f"tune.search_space.{key}.{kind}: the list of values is empty")
        if key != PARTS_KEY:
            _check_path(cfg, key)
        if key == PARTS_KEY and any(v not in PARTS for v in values):
            raise ConfigError(f"tune.search_space.{key}: values must be among {list(PARTS)}, got {values}")
        if kind == "grid":
            out[key] = tune.grid_search(list(values))
        elif kind == "choice":
            out[key] = tune.choice(list(values))
        elif kind in ("uniform", "loguniform") and len(values) == 2:
            out[key] = (tune.uniform if kind == "uniform" else tune.loguniform)(*values)
        else:
            raise ConfigError(f"tune.search_space.{key}: unknown kind {kind!r} or wrong values {values}; "
                              "use grid/choice: [..] or uniform/loguniform: [low, high]")
    _check_arm_settings(cfg, space)
    return out


def _check_arm_settings(cfg: StudentConfig, space: dict[str, dict[str, list[Any]]]) -> None:
    """``tune.arm_settings`` names arms of ``distill.parts`` (settings of an arm the sweep does not run are
    unused, so configs can share them) and config keys the sweep does not also search (one place decides a
    key's value in a trial)."""
    for arm, settings in cfg.tune.arm_settings.items():
        if arm not in PARTS:
            raise ConfigError(f"tune.arm_settings.{arm}: not an arm of {PARTS_KEY}; arms are {list(PARTS)}")
        for key in settings:
            if key == PARTS_KEY or key in space:
                raise ConfigError(f"tune.arm_settings.{arm}.{key}: the sweep also searches {key}; keep one")
            try:
                _check_path(cfg, key)
            except ConfigError:
                raise ConfigError(f"tune.arm_settings.{arm}: {key!r} is not a config key") from None


def _check_path(cfg: StudentConfig, key: str) -> None:
    node: Any = cfg
    for part in key.split("."):
        if not hasattr(type(node), "model_fields") or part not in type(node).model_fields:
            raise ConfigError(f"tune.search_space: {key!r} is not a config key (and not {PARTS_KEY})")
        node = getattr(node, part)


def apply_params(base: StudentConfig, params: dict[str, Any]) -> StudentConfig:
    """The base config with a trial's sampled values written in (validated again)."""
    data = base.model_dump(mode="json")
    for key, value in params.items():
        if key == PARTS_KEY:
            tokens, output_on, _ = PARTS[value]
            data["distill"]["token"]["enabled"] = tokens is not None
            data["distill"]["token"]["random"] = tokens == "random"
            data["distill"]["output"]["enabled"] = output_on
            continue
        _write(data, key, value)
    arm = params.get(PARTS_KEY)  # the arm's own settings win over searched keys, in whatever order they came
    for key, value in base.tune.arm_settings.get(arm, {}).items():
        _write(data, key, value)
    if arm == "none":  # the baseline: the student alone, no teacher term and no second stage
        data["distill"]["feature"]["weight"] = 0.0
        data["distill"]["second_stage"]["epochs"] = 0
    if arm is not None and not PARTS[arm][2]:
        data["distill"]["unlabeled"]["ratio"] = 0.0  # labelled crops only
    if arm == "unlabeled" and not (data["distill"]["unlabeled"]["images"] and data["distill"]["unlabeled"]["ratio"]):
        raise ConfigError("the distill.parts 'unlabeled' arm needs an unlabeled set: set distill.unlabeled.images "
                          "and distill.unlabeled.boxes, and distill.unlabeled.ratio above 0")
    try:
        return StudentConfig.model_validate(data)
    except Exception as err:
        raise ConfigError(f"trial parameters {params} give an invalid config: {err}") from None


def _write(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    *parents, last = key.split(".")
    for part in parents:
        node = node[part]
    node[last] = value


def preparation(cfg: StudentConfig) -> tuple[TokenSetting | None, str | None]:
    """What a trial of ``cfg`` needs made before the trials: learned tokens (None for no tokens or random
    ones) and the view bank it trains on (its ``view_stream``, None in online mode)."""
    t = cfg.distill.token
    tokens = TokenSetting.from_config(cfg) if t.enabled and not t.random else None
    if cfg.distill.output.mode != "bank":
        return tokens, None
    # The unlabelled set's bank, for the arms that learn from it, is made beside the labelled one.
    unlabeled = {"unlabeled": cfg.distill.unlabeled.model_dump(exclude={"ratio"})} if uses_unlabeled(cfg) else {}
    features = {"features": True} if cfg.distill.feature.weight > 0 else {}  # the banks also hold its tokens
    return tokens, json.dumps({**view_stream(cfg), **unlabeled, **features}, sort_keys=True)


def asks_for_unlabeled(cfg: StudentConfig) -> bool:
    """Whether ``cfg`` asks for the unlabelled set: a share of output distillation's crops (bank mode or not)."""
    o, u = cfg.distill.output, cfg.distill.unlabeled
    return u.enabled and u.ratio > 0 and o.enabled


def uses_unlabeled(cfg: StudentConfig) -> bool:
    """Whether trials of ``cfg`` train on the unlabelled set: only an arm with output distillation learns from it,
    from the view bank the teacher labels it into."""
    return asks_for_unlabeled(cfg) and cfg.distill.output.mode == "bank"


def trial_preparations(cfg: StudentConfig) -> list[StudentConfig]:
    """One trial config per distinct ``preparation`` the sweep can ask for (tokens and banks are made once,
    before the trials). A searched key that changes them must be grid or choice: a sampled value would ask
    for tokens or a bank nobody made, so it is refused here with the key's name."""
    space = searched(cfg)
    arms = list(arm_configs(cfg).values())
    enumerated: dict[str, list[Any]] = {}
    for key, spec in space.items():
        kind, values = next(iter(spec.items()))
        if key == PARTS_KEY:
            enumerated[key] = list(values)
            continue
        if all(preparation(apply_params(arm, {key: v})) == preparation(arm) for arm in arms for v in values):
            continue  # e.g. train.lr: the base config's tokens and bank whatever its value
        if kind not in ("grid", "choice"):
            raise ConfigError(f"tune.search_space.{key}: a {kind} value changes the knowledge tokens or the view "
                              "bank, which are made once before the trials; search it with grid or choice")
        enumerated[key] = list(values)
    configs: dict[tuple[Any, ...], StudentConfig] = {}
    for combo in itertools.product(*enumerated.values()):
        trial = apply_params(cfg, dict(zip(enumerated, combo, strict=True)))
        configs.setdefault(preparation(trial), trial)
    return list(configs.values())


def arm_configs(cfg: StudentConfig) -> dict[str, StudentConfig]:
    """The sweep's arms (the ``distill.parts`` values searched) as configs; the base config's own arm when
    the parts are not searched."""
    space = cfg.tune.search_space
    if PARTS_KEY not in space:
        t, o = cfg.distill.token, cfg.distill.output
        own = (("random" if t.random else "teacher") if t.enabled else None, o.enabled, uses_unlabeled(cfg))
        name = next((a for a, parts in PARTS.items() if parts == own), "custom")
        return {name: cfg}
    return {arm: apply_params(cfg, {PARTS_KEY: arm}) for arm in next(iter(space[PARTS_KEY].values()))}
