"""The sweep's search space: ``tune.search_space`` from the config -> Tune's param_space, and back from a
trial's sampled values to a validated config. ``distill.parts`` is a virtual key naming the paper's
ablation arms (which distillation parts are on); every other key is a dotted config key.
"""

from __future__ import annotations

import itertools
from typing import Any

from vitpose.config import ConfigError, StudentConfig
from vitpose.distill.tokens import TokenSetting

PARTS = {"none": (False, False), "token": (True, False), "output": (False, True), "both": (True, True)}
# A virtual key: which distillation parts are on, as the paper's ablation names them.
PARTS_KEY = "distill.parts"
TOKEN_KEYS = ("distill.token.num_tokens", "distill.token.epochs", "distill.token.lr")


def search_space(cfg: StudentConfig) -> dict[str, Any]:
    """Tune's param_space from ``tune.search_space`` ({"grid"|"choice"|"uniform"|"loguniform": [...]})."""
    from ray import tune

    space = cfg.tune.search_space
    if not space:
        raise ConfigError("tune.search_space is empty: give at least one key, e.g. "
                          "{distill.parts: {grid: [none, token, output, both]}}")
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
        if key in TOKEN_KEYS and kind not in ("grid", "choice"):
            raise ConfigError(f"tune.search_space.{key}: token settings must be grid or choice (tokens are "
                              "learned once per setting before the trials)")
        if kind == "grid":
            out[key] = tune.grid_search(list(values))
        elif kind == "choice":
            out[key] = tune.choice(list(values))
        elif kind in ("uniform", "loguniform") and len(values) == 2:
            out[key] = (tune.uniform if kind == "uniform" else tune.loguniform)(*values)
        else:
            raise ConfigError(f"tune.search_space.{key}: unknown kind {kind!r} or wrong values {values}; "
                              "use grid/choice: [..] or uniform/loguniform: [low, high]")
    return out


def _check_path(cfg: StudentConfig, key: str) -> None:
    node: Any = cfg
    for part in key.split("."):
        if not hasattr(node, "model_fields") or part not in type(node).model_fields:
            raise ConfigError(f"tune.search_space: {key!r} is not a config key (and not {PARTS_KEY})")
        node = getattr(node, part)


def apply_params(base: StudentConfig, params: dict[str, Any]) -> StudentConfig:
    """The base config with a trial's sampled values written in (validated again)."""
    data = base.model_dump(mode="json")
    for key, value in params.items():
        if key == PARTS_KEY:
            token_on, output_on = PARTS[value]
            data["distill"]["token"]["enabled"] = token_on
            data["distill"]["output"]["enabled"] = output_on
            continue
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    try:
        return StudentConfig.model_validate(data)
    except Exception as err:
        raise ConfigError(f"trial parameters {params} give an invalid config: {err}") from None


def token_settings(cfg: StudentConfig) -> list[Any]:
    """Every distinct token setting the sweep can ask for (learned before the trials start)."""
    space = cfg.tune.search_space
    parts = next(iter(space[PARTS_KEY].values())) if PARTS_KEY in space else None
    if parts is not None and not any(PARTS[p][0] for p in parts):
        return []
    if parts is None and not cfg.distill.token.enabled and "distill.token.enabled" not in space:
        return []
    values = [next(iter(space[k].values())) if k in space else [None] for k in TOKEN_KEYS]
    settings = []
    for combo in itertools.product(*values):
        searched = {k: v for k, v in zip(TOKEN_KEYS, combo, strict=True) if v is not None}
        settings.append(TokenSetting.from_config(apply_params(cfg, searched)))
    return list(dict.fromkeys(settings))


def needs_bank(cfg: StudentConfig) -> bool:
    if cfg.distill.output.mode != "bank":
        return False
    space = cfg.tune.search_space
    if PARTS_KEY in space:
        return any(PARTS[p][1] for p in next(iter(space[PARTS_KEY].values())))
    return cfg.distill.output.enabled or "distill.output.enabled" in space
