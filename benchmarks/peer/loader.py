"""Section 5 of ``benchmarks.compare_peer``: the tiny teacher as configured, run by the real engine's
``Trainer.train_epoch`` on its ranks, epochs fed by the real DataLoader against the same batches as pre-made
tensors, interleaved."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.harness import interleave, ratio
from benchmarks.peer.common import set_dist_env, tiny_config
from vitpose.train.session import NullSession, free_port


def _loader_rank(rank: int, world: int, port: int, steps: int, reps: int, sets: list[str], queue: Any) -> None:
    try:
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed deprecations, per step
        set_dist_env(rank, world, port)
        cfg = tiny_config(["train.eval_every=1000", *sets])
        torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))  # what Ray gives a worker (OMP_NUM_THREADS)
        from vitpose.train.loop import Trainer

        trainer = Trainer(cfg, NullSession(rank, world))
        steps = min(steps or trainer.loaders.steps_per_epoch, trainer.loaders.steps_per_epoch)
        real_loader = trainer.loaders.train
        # Warm-up, untimed: DeepSpeed's buffers, the loader processes (if any) and half the image cache (a
        # rank meets the other half over the next epochs, as in training).
        trainer.train_epoch(0, 1 + reps, max_steps=steps)
        premade = list(itertools.islice(iter(real_loader), steps))  # the same kind of batches, made beforehand
        epoch = [0]

        def feed(batches: Any) -> Callable[[], float]:
            def run() -> float:  # seconds per step, as the Trainer measured the epoch
                trainer.loaders.train = batches
                stats = trainer.train_epoch(1 + epoch[0], 1 + reps, max_steps=steps)
                return stats.seconds / max(stats.steps, 1)
            return run

        # Loader and tensors in turns (loader first in even repetitions), each epoch timed by the Trainer.
        times = interleave({"loader": feed(real_loader), "tensors": feed(premade)}, reps, warmup=0,
                           self_timed=True, before_round=lambda r: epoch.__setitem__(0, r))
        if rank == 0:
            queue.put({"steps per epoch": steps, "reps": reps, "batch per worker": cfg.train.batch_size,
                       "workers": world, "loader processes per worker": cfg.data.loader_workers,
                       "image cache MB": cfg.data.image_cache_mb,
                       "zero stage": trainer.stage, "img_size": list(trainer.spec.img_size), **times})
    except BaseException as err:  # the parent must not wait forever
        queue.put({"error": f"rank {rank}: {type(err).__name__}: {err}"})
        raise


def loader_vs_tensors(steps: int, reps: int, say: Callable[[str], None], sets: list[str] = ()) -> dict[str, Any]:
    import torch.multiprocessing as mp

    from vitpose.build import ensure_data

    cfg = tiny_config(list(sets))
    ensure_data(cfg)  # before the workers start, so generating the data is not timed
    world = cfg.ray.num_workers
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_loader_rank, args=(r, world, port, steps, reps, list(sets), queue)) for r in range(world)]
    for p in procs:
        p.start()
    result = queue.get(timeout=1800)
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
    if "error" in result:
        raise RuntimeError(result["error"])
    loader, tensors = statistics.median(result["loader"]), statistics.median(result["tensors"])
    paired = ratio(result["loader"], result["tensors"])
    result.update({"loader s/step": loader, "tensors s/step": tensors, "slowdown": paired["median"] - 1,
                   "slowdown range": [paired["min"] - 1, paired["max"] - 1]})
    say(f"tiny teacher, {world} workers: {loader:.3f} s/step with the data loader, {tensors:.3f} s/step with "
        f"pre-made tensors: {100 * result['slowdown']:+.1f}%")
    return result

