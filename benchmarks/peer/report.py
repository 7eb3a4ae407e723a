"""The report of ``benchmarks.compare_peer``: the targets of issues 8 and 19, checked, and the markdown."""

from __future__ import annotations

import shlex
from typing import Any

from benchmarks.harness import REPO, load_average
from benchmarks.peer.common import TINY_TEACHER
from benchmarks.peer.shipped import PairRow
from benchmarks.peer.speed import Row

# -------------------------------------------------------------------------------------------- report
SHIPPED_TARGET_TEXT = """Targets (issue 19): the shipped step (DeepSpeed ZeRO-0 engine, one rank) >= 1.0x the peer's plain
loop in fp32 and >= 1.15x in bf16; ZeRO-3 on two ranks >= 0.9x the peer under DDP on two ranks."""
TARGETS = """Targets (issue 8): ours/peer >= 1.0 on every row at equal precision, >= 1.15 on the training step;
our bf16 inference >= 1.8x our fp32 at batch 32; training-step MFU >= 75% of the fp32 matmul peak; bf16 AP
within 0.5 points of fp32; the data loader slows the tiny teacher's step by <= 10%.
""" + SHIPPED_TARGET_TEXT


def spread(row: Row | PairRow) -> str:
    """The min-max of a row's per-repetition ratios."""
    stats = row.ratio_stats
    return f"{stats['min']:.3f}-{stats['max']:.3f}"


def check_targets(rows: list[Row], peaks: dict[str, float], ap: dict[str, Any] | None,
                  loader: dict[str, Any] | None, pairs: list[PairRow] = ()) -> list[tuple[str, str, bool]]:
    out = []
    for r in pairs:
        if r.target is not None:
            out.append((f"{r.model} {r.precision} shipped ZeRO-{r.stage} step on {r.ranks} rank(s) / "
                        f"peer's {'DDP' if r.ranks > 1 else 'plain'} loop >= {r.target:g}", f"{r.ratio:.3f}",
                        r.ratio >= r.target))
    for r in rows:
        need = 1.15 if r.case == "train b16" else 1.0
        out.append((f"{r.model} {r.precision} {r.case}: ours/peer >= {need}", f"{r.ratio:.3f}", r.ratio >= need))
    by = {(r.model, r.precision, r.case): r for r in rows}
    for model in dict.fromkeys(r.model for r in rows):
        f, b = by.get((model, "fp32", "infer b32")), by.get((model, "bf16", "infer b32"))
        if f and b:
            speed = b.ips("ours") / f.ips("ours")
            out.append((f"{model} our bf16 / fp32 inference b32 >= 1.8", f"{speed:.2f}x", speed >= 1.8))
        for precision in ("fp32", "bf16"):
            t = by.get((model, precision, "train b16"))
            if t:
                mfu = t.mfu("ours", peaks["fp32"])
                out.append((f"{model} our {precision} training-step MFU >= 75% of the fp32 peak", f"{100 * mfu:.0f}%",
                            mfu >= 0.75))
    if ap:
        d = ap["AP difference (points)"]
        out.append(("bf16 AP within 0.5 points of fp32", f"{d:+.2f}", abs(d) <= 0.5))
    if loader:
        s = loader["slowdown"]
        out.append(("data loader slows the tiny teacher's step by <= 10%", f"{100 * s:+.1f}%", s <= 0.10))
    return out


def markdown(info: dict[str, Any], peaks: dict[str, Any], diffs: dict[str, dict[str, float]], rows: list[Row],
             ap: dict[str, Any] | None, loader: dict[str, Any] | None, targets: list[tuple[str, str, bool]],
             argv: list[str], seconds: float, profiles: dict[str, dict[str, str]],
             pairs: list[PairRow] = (), shipped: list[dict[str, Any]] = ()) -> str:
    L = ["# Performance: ours vs the transformers VitPose port, and vs the machine", "",
         "Written by `python -m benchmarks.compare_peer " + shlex.join(argv) + f"` ({seconds / 60:.1f} min). "
         "Every number below was measured in that one run; see the script's docstring for what each means.", "",
         "## Machine", "", "| | |", "| --- | --- |"]
    L += [f"| {k} | {v} |" for k, v in info.items()]
    L += [f"| matmul peak {p} (2048^3, best of the run) | {peaks[p]:.0f} GFLOP/s (start {peaks[f'{p} start']:.0f}, "
          f"end {peaks[f'{p} end']:.0f}, median beside the rows {peaks[f'{p} beside rows']:.0f}) |"
          for p in ("fp32", "bf16")]
    L += [""]
    L += ["## 1. Same function", "",
          "Our weights copied into `VitPoseForPoseEstimation` (ours built with drop_path_rate=0; BatchNorm "
          "statistics randomised, heatmaps scaled to ~1).", ""]
    if diffs:
        keys = list(next(iter(diffs.values())))
        L += ["| model | " + " | ".join(keys) + " |", "| --- |" + " ---: |" * len(keys)]
        L += [f"| {m} | " + " | ".join(f"{v:.2e}" for v in d.values()) + " |" for m, d in diffs.items()]
    L += ["", "## 2-3. Speed (images/s, medians) and model-FLOPs utilisation", "",
          "Interleaved A/B. Ratio = ours/peer (median of per-repetition ratios; in brackets their min-max). MFU = analytic FLOPs / time / "
          "matmul peak of the row's precision: against the best peak of the run (fp32 rows: fp32 peak; bf16 rows: "
          "bf16 peak, and in brackets against the fp32 peak), and against the matmul measured beside each "
          "repetition (same load; median). Training step: ours with fused AdamW, peer with torch's default "
          "AdamW; `fwd+bwd` rows: no optimizer step.", "",
          "| model | precision | case | ours img/s | peer img/s | ours/peer | ours MFU | ours MFU (beside) | peer MFU |",
          "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        peak = peaks[r.precision]
        extra = f" ({100 * r.mfu('ours', peaks['fp32']):.0f}% of fp32)" if r.precision == "bf16" else ""
        L.append(f"| {r.model} | {r.precision} | {r.case} | {r.ips('ours'):.2f} | {r.ips('peer'):.2f} | "
                 f"**{r.ratio:.3f}** ({spread(r)}) | {100 * r.mfu('ours', peak):.0f}%{extra} | {100 * r.mfu_adjacent:.0f}% | "
                 f"{100 * r.mfu('peer', peak):.0f}% |")
    if pairs:
        L += [""] + shipped_section(pairs, shipped)
    L += ["", "## 4. bf16 accuracy", ""]
    if ap:
        L += [f"Model: `{ap['model']}` (embed {ap['preset']['embed_dim']}, depth {ap['preset']['depth']}, patch {ap['preset']['patch_size']} at {ap['preset']['img_size']}), {ap['val instances']} synthetic "
              "val instances, flip test on.", "", "| | fp32 | bf16 autocast |", "| --- | ---: | ---: |"]
        for k in ("AP", "AP50", "AP75", "AR"):
            if k in ap["fp32"]:
                L.append(f"| {k} | {100 * ap['fp32'][k]:.2f} | {100 * ap['bf16'][k]:.2f} |")
        L += [f"| eval seconds | {ap['fp32 seconds']:.1f} | {ap['bf16 seconds']:.1f} |", "",
              f"AP difference bf16 - fp32: **{ap['AP difference (points)']:+.2f} points**; max abs heatmap "
              f"difference {ap['bf16 vs fp32 max abs heatmap diff (one batch)']:.2e} (max abs heatmap "
              f"{ap['max abs heatmap']:.2f})."]
    else:
        L.append("Skipped (--skip-ap).")
    L += ["", "## 5. Data loader vs model", ""]
    if loader:
        L += [f"Tiny teacher as configured ({TINY_TEACHER.relative_to(REPO)}): {loader['workers']} training workers "
              f"(1 thread each), {loader['loader processes per worker']} loader processes per worker (0: items "
              f"loaded in the worker's own process), image cache {loader['image cache MB']:g} MB, ZeRO-"
              f"{loader['zero stage']}, batch {loader['batch per worker']} per worker at {loader['img_size']}; "
              f"{loader['reps']} interleaved epochs of {loader['steps per epoch']} steps each way.", "",
              "| feed | s/step (median) | all epochs |", "| --- | ---: | --- |",
              f"| real DataLoader | {loader['loader s/step']:.3f} | {', '.join(f'{t:.3f}' for t in loader['loader'])} |",
              f"| pre-made tensors | {loader['tensors s/step']:.3f} | {', '.join(f'{t:.3f}' for t in loader['tensors'])} |",
              "", f"Slowdown from the loader (median of the per-epoch-pair ratios): **{100 * loader['slowdown']:+.1f}%**"
              + (" ({:+.1f}% to {:+.1f}%).".format(*(100 * x for x in loader["slowdown range"]))
                 if "slowdown range" in loader else ".")]
    else:
        L.append("Skipped (--skip-loader).")
    L += ["", "## Targets", "", TARGETS, "", "| target | measured | met |", "| --- | ---: | --- |"]
    L += [f"| {name} | {value} | {'yes' if ok else '**no**'} |" for name, value, ok in targets]
    if profiles:
        L += ["", "## Profiles", "", "torch.profiler, one training step at batch 16 (forward, MSE, backward, AdamW), "
              "operators by self CPU time."]
        for title, tables in profiles.items():
            for who, table in tables.items():
                L += ["", f"{title}, {who}:", "", "```", table.strip(), "```"]
    L += ["", f"Load average at the end: {load_average()}.", ""]
    return "\n".join(L)


def shipped_markdown(info: dict[str, Any], pairs: list[PairRow], shipped: list[dict[str, Any]],
                     targets: list[tuple[str, str, bool]], argv: list[str], seconds: float) -> str:
    """The report of ``--shipped-only``: the machine, section 2b and its targets."""
    L = ["# The shipped training step (DeepSpeed engine) vs the transformers VitPose port", "",
         "Written by `python -m benchmarks.compare_peer " + shlex.join(argv) + f"` ({seconds / 60:.1f} min); section "
         "2b of benchmarks/RESULTS.md, measured alone.", "", "## Machine", "", "| | |", "| --- | --- |"]
    L += [f"| {k} | {v} |" for k, v in info.items()]
    L += [""] + shipped_section(pairs, shipped)
    L += ["", "## Targets", "", SHIPPED_TARGET_TEXT, "", "| target | measured | met |", "| --- | ---: | --- |"]
    L += [f"| {name} | {value} | {'yes' if ok else '**no**'} |" for name, value, ok in targets]
    L += ["", f"Load average at the end: {load_average()}.", ""]
    return "\n".join(L)



def shipped_section(pairs: list[PairRow], results: list[dict[str, Any]]) -> list[str]:
    L = ["## 2b. The shipped training step vs the peer's plain loop", "",
         "Our side is the step a user runs: the real `Trainer.train_epoch` (lr schedule, loss, finiteness check, "
         "`engine.backward`, `engine.step`) over the DeepSpeed engine that `deepspeed.initialize` built from "
         "configs/deepspeed/zero<stage>.json as completed by vitpose/train/deepspeed_config.py (the paper's layer-decayed "
         "groups, clipping 1.0, DeepSpeed's precision handling), fed one pre-made batch of the synthetic set. "
         "ZeRO-0 on one rank, ZeRO-3 on two ranks (gloo, one process each, threads split). The peer is "
         "`VitPoseForPoseEstimation` in a plain torch loop (DDP on two ranks) with the same AdamW class and "
         "clipping, one parameter group, at the closest precision (bf16: autocast over fp32 weights). The engine "
         "with the other AdamW (fused / torch's default for-loop) is timed in the same rotation, so the AdamW "
         "before/after is measured beside it. Three-way interleaved (every order in turn) after warm-up steps; "
         "ratio = a/b in images/s (median of per-repetition ratios; in brackets their min-max); a two-rank step lasts until its slower rank "
         "is done. Optimizer phase: the median seconds of the engine's `engine.step()` (clipping, the wrapper's "
         "copies and collectives, AdamW), the peer's clipping + `opt.step()` + `zero_grad`.", "",
         "| model | precision | ZeRO | ranks x batch | a / b | a img/s | b img/s | a/b | target | optimizer phase a / b (s) "
         "| a | b | note |",
         "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for r in pairs:
        target = f"{r.target:g}" if r.target else "-"
        L.append(f"| {r.model} | {r.precision} | {r.stage} | {r.ranks} x {r.batch} | {r.kind} | {r.ips('a'):.2f} | "
                 f"{r.ips('b'):.2f} | **{r.ratio:.3f}** ({spread(r)}) | {target} | {r.opt_s('a'):.3f} / {r.opt_s('b'):.3f} | "
                 f"{r.a_label} | {r.b_label} | {r.note} |")
    if results:
        L += ["", "Seconds per step of each repetition, in order (the slower rank's; optimizer phase after the bar):", ""]
        L += [f"- {x['model']} {x['precision']} ZeRO-{x['stage']} {x['ranks']} rank(s): " + "; ".join(
            f"{k} {', '.join(f'{t:.2f}' for t in x['times'][k])}"
            + (f" | {', '.join(f'{t:.3f}' for t in x['times'][f'{k} opt'])}" if f"{k} opt" in x["times"] else "")
            for k in ("shipped", "other", "peer")) for x in results]
        L += ["", "Load average while each ran: " + "; ".join(
            f"{x['model']} {x['precision']} ZeRO-{x['stage']} {x['ranks']} rank(s) on {x.get('device', 'cpu')}: "
            f"{x['load average']} ({x['seconds']:.0f}s)"
            for x in results) + "."]
    return L

