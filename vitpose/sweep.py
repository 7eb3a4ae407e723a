"""The distillation sweep: search space → Ray Tune trials → nested MLflow runs → the champion student.

The driver (``pipelines/distill.py``) prepares what every trial shares (the teacher on local disk, the
knowledge tokens of each token setting in the space, the view bank) once, then Tune runs ``run_trial``
per setting with ASHA stopping weak trials early. Each trial is one engine worker (``TuneSession``) and
its own MLflow run nested under the sweep's run.
"""

from __future__ import annotations

import itertools
import os
import socket
from pathlib import Path
from typing import Any

from vitpose.config import ConfigError, StudentConfig

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
    from vitpose.distill import TokenSetting

    space = cfg.tune.search_space
    parts = next(iter(space[PARTS_KEY].values())) if PARTS_KEY in space else None
    if parts is not None and not any(PARTS[p][0] for p in parts):
        return []
    if parts is None and not cfg.distill.token.enabled and "distill.token.enabled" not in space:
        return []
    t = cfg.distill.token
    values = [next(iter(space[k].values())) if k in space else [getattr(t, k.rsplit(".", 1)[1])] for k in TOKEN_KEYS]
    return [TokenSetting(num_tokens=int(n), epochs=int(e), lr=float(lr), seed=cfg.train.seed,
                         batch_size=cfg.train.batch_size) for n, e, lr in itertools.product(*values)]


def needs_bank(cfg: StudentConfig) -> bool:
    if cfg.distill.output.mode != "bank":
        return False
    space = cfg.tune.search_space
    if PARTS_KEY in space:
        return any(PARTS[p][1] for p in next(iter(space[PARTS_KEY].values())))
    return cfg.distill.output.enabled or "distill.output.enabled" in space


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_trial(config: dict[str, Any], shared: dict[str, Any]) -> None:
    """Tune's function trainable: one student trained by the shared engine.

    ``config`` holds the trial's sampled values; ``shared`` (bound with ``tune.with_parameters``) what
    every trial shares: the base config, the teacher/tokens/bank locations and the parent MLflow run.
    """
    import logging
    import warnings

    from ray import tune

    from vitpose.distill import BankedViews, ViewBank, build_student, distill_loss, frozen, load_tokens
    from vitpose.engine import Trainer, TuneSession, build_datasets
    from vitpose.serving import load_vitpose
    from vitpose.tracking import WorkerTracker, start_trial_run

    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    params = dict(config)
    cfg = apply_params(StudentConfig.model_validate(shared["base"]), params)
    # Each trial is its own one-rank process group: its own port, so concurrent trials never meet.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    trial_id = tune.get_context().get_trial_id()
    run_id = start_trial_run(cfg, shared["tracking_uri"], shared["parent_run_id"], trial_id, params)
    tracker = WorkerTracker(shared["tracking_uri"], run_id)

    train_ds, val_ds = build_datasets(cfg, is_local_leader=False)
    tokens = None
    if cfg.distill.token.enabled:
        from vitpose.distill import TokenSetting

        t = cfg.distill.token
        setting = TokenSetting(t.num_tokens, t.epochs, t.lr, cfg.train.seed, cfg.train.batch_size)
        tokens = load_tokens(Path(shared["token_dir"]) / f"tokens-{setting.key(shared['teacher_id'])}.safetensors")
    model = build_student(cfg, tokens)
    teacher = None
    if cfg.distill.output.enabled:
        if cfg.distill.output.mode == "bank":
            train_ds = BankedViews(train_ds, ViewBank(Path(shared["bank_dir"])), cfg.train.seed)
        else:
            teacher = frozen(load_vitpose(shared["teacher_dir"])[0])
    loss = distill_loss(cfg.distill.output.weight if cfg.distill.output.enabled else 0.0, teacher)
    # The run's final status is set by the driver (close_trial_runs): Tune may stop a trial inside its
    # last report, before any code after fit() would run.
    try:
        Trainer(cfg, TuneSession(), model=model, loss_fn=loss, datasets=(train_ds, val_ds), tracker=tracker,
                log_prefix=f"[{trial_id}] ").fit()
    finally:
        tracker.close()


def plot_sweep(table: Any, metric: str, path: Path) -> Path:
    """Val AP against each searched setting, one panel per setting (categorical ones as strip plots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in table.columns if c.startswith("config/")]
    fig, axes = plt.subplots(1, max(len(columns), 1), figsize=(4 * max(len(columns), 1), 3.2), squeeze=False)
    for ax, col in zip(axes[0], columns, strict=False):
        values = table[col]
        if values.map(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)).all():
            ax.scatter(values, table[metric])
        else:
            labels = sorted({str(v) for v in values})
            ax.scatter([labels.index(str(v)) for v in values], table[metric])
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(col.removeprefix("config/"))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def close_trial_runs(results: Any, tracking_uri: str, parent_run_id: str) -> None:
    """Mark each trial's nested MLflow run FINISHED (or FAILED, for trials that errored)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    by_trial = {r.data.tags.get("trial_id"): r for r in runs}
    for result in results:
        run = by_trial.get((result.metrics or {}).get("trial_id"))
        if run is not None and run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "FAILED" if result.error else "FINISHED")
