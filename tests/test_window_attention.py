"""Window attention (paper §4): the windowed blocks against a masked full attention written from the geometry,
border leaks of shifted windows, the reach of pooled windows, and weights shared with full attention."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vitpose.config import load_config
from vitpose.models import AttentionSpec, build_model
from vitpose.models.attention import (
    WindowLayout,
    attend,
    explicit_attention,
    from_windows,
    pooled_tokens,
    to_windows,
    window_attention,
    window_mask,
)
from vitpose.models.backbone import Attention

DIM, HEADS = 32, 4


def _attention(layout: WindowLayout | None) -> Attention:
    torch.manual_seed(0)
    return Attention(DIM, HEADS, layout=layout).eval()


def _reference(attn: Attention, x: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """Full attention over grid tokens + pooled tokens + global tokens, with a mask from coordinates alone:
    two grid tokens see each other when they fall in the same window of the grid offset by the shift (Swin's
    shifted windows without the roll: the stretch before the first shifted boundary is a window of its own)."""
    b, n, _ = x.shape
    (gh, gw), (wh, ww), (sh, sw) = layout.grid, layout.window, layout.shift
    grid_n = gh * gw
    q, k, v = attn.qkv(x).reshape(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
    rows, cols = torch.arange(gh).repeat_interleave(gw), torch.arange(gw).repeat(gh)
    win = ((rows + wh - sh) // wh) * 1000 + (cols + ww - sw) // ww
    keys, values = [k], [v]
    pooled = 0
    if layout.pool is not None:
        ph, pw = layout.pool
        cells = [(r, c) for r in range(0, gh, ph) for c in range(0, gw, pw)]
        pooled = len(cells)
        for src, out in ((k, keys), (v, values)):
            g = src[:, :, :grid_n].reshape(b, HEADS, gh, gw, -1)
            out.append(torch.stack([g[:, :, r:r + ph, c:c + pw].mean((2, 3)) for r, c in cells], dim=2))
    allowed = torch.zeros(n, n + pooled, dtype=torch.bool)
    allowed[:grid_n, :grid_n] = win[:, None] == win[None, :]
    allowed[:grid_n, n:] = True  # pooled keys: every window
    allowed[:, grid_n:n] = True  # global (knowledge) tokens: seen by all
    allowed[grid_n:, :n] = True  # ... and they see every token, not the pooled ones
    # keys ordered [grid + global, pooled] to match `allowed`
    k_all, v_all = torch.cat(keys, dim=2), torch.cat(values, dim=2)
    scores = (q @ k_all.transpose(-2, -1)) / math.sqrt(DIM // HEADS)
    out = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v_all
    return attn.proj(out.transpose(1, 2).reshape(b, n, DIM))


CASES = [  # grid, window, shift, pool, global tokens
    ((6, 6), (3, 3), (0, 0), None, 0),
    ((7, 5), (4, 4), (0, 0), None, 0),  # padded to 8x8
    ((8, 8), (4, 4), (2, 2), None, 0),
    ((9, 7), (4, 4), (2, 2), None, 2),  # padded and shifted, with knowledge tokens
    ((8, 6), (4, 3), (0, 0), (4, 3), 0),
    ((9, 7), (4, 4), (2, 2), (4, 4), 1),  # everything at once; ragged pool cells at the border
]


@pytest.mark.parametrize(("grid", "window", "shift", "pool", "extra"), CASES)
def test_windowed_block_equals_masked_full_attention(grid, window, shift, pool, extra) -> None:
    layout = WindowLayout(grid, window, shift, pool)
    attn = _attention(layout)
    x = torch.randn(2, grid[0] * grid[1] + extra, DIM)
    torch.testing.assert_close(attn(x), _reference(attn, x, layout), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("grid", "window", "shift", "pool", "extra"), CASES)
def test_windows_gather_and_scatter_back_every_token(grid, window, shift, pool, extra) -> None:
    layout = WindowLayout(grid, window, shift, pool)
    t = torch.randn(2, HEADS, grid[0] * grid[1], 8)
    w = to_windows(t, layout)
    assert w.shape == (2 * layout.num_windows, HEADS, layout.window_tokens, 8)
    assert torch.equal(from_windows(w, layout).transpose(1, 2), t)


def test_pooled_keys_match_avg_pool_and_keep_no_copy_of_the_tokens_for_backward() -> None:
    layout = WindowLayout((9, 7), (4, 4), (0, 0), (4, 4))
    qkv = torch.randn(2, 63, 3, HEADS, 8, requires_grad=True)
    k = qkv[:, :, 1].transpose(1, 2)  # as the block slices it: a view of the qkv output
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        pooled = pooled_tokens(k, layout)
    # only the constant averaging matrix (fp32 here), broadcast over the batch
    assert {t.untyped_storage().nbytes() for t in saved} == {layout.num_pooled * 63 * 4}
    grid = k.reshape(2 * HEADS, 9, 7, 8).permute(0, 3, 1, 2)
    expected = F.avg_pool2d(grid, 4, 4, ceil_mode=True).flatten(2).transpose(1, 2).reshape(2, HEADS, -1, 8)
    torch.testing.assert_close(pooled, expected)


def test_one_window_holding_the_grid_is_full_attention() -> None:
    full, layout = _attention(None), WindowLayout((6, 4), (6, 4), (0, 0), None)
    windowed = _attention(layout)
    x = torch.randn(3, 24, DIM)
    assert (windowed(x) - full(x)).abs().max() < 1e-6
    q, k, v = torch.randn(3, 2, HEADS, 24, 8).unbind(0)
    assert (window_attention(q, k, v, layout, None) - attend(q, k, v)).abs().max() < 1e-6
    # and the spec says so itself: a window >= the grid (clamped) builds a full-attention block
    assert AttentionSpec(kind="shift_window", window=(32, 32)).layout(1, (6, 4)) is None


def _changed(attn: Attention, grid: tuple[int, int], token: tuple[int, int]) -> set[tuple[int, int]]:
    """Grid positions whose output moves when the input token at `token` is perturbed."""
    torch.manual_seed(1)
    x = torch.randn(1, grid[0] * grid[1], DIM)
    y = x.clone()
    y[0, token[0] * grid[1] + token[1]] += 3.0
    moved = (attn(y) - attn(x)).abs().amax(-1)[0] > 1e-6
    return {(int(i) // grid[1], int(i) % grid[1]) for i in torch.nonzero(moved).flatten()}


def test_shifted_windows_do_not_leak_across_image_borders() -> None:
    # 8x8 grid, 4x4 windows shifted by 2: after the roll, the top-left 2x2 corner shares a window with the
    # bottom and right border tokens; the mask must keep it to itself.
    layout = WindowLayout((8, 8), (4, 4), (2, 2), None)
    assert _changed(_attention(layout), (8, 8), (0, 0)) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    # An inner token's shifted window: rows 2-5, cols 2-5.
    assert _changed(_attention(layout), (8, 8), (3, 4)) == {(r, c) for r in range(2, 6) for c in range(2, 6)}
    # Unshifted, the corner's window is the plain top-left 4x4.
    plain = WindowLayout((8, 8), (4, 4), (0, 0), None)
    assert _changed(_attention(plain), (8, 8), (0, 0)) == {(r, c) for r in range(4) for c in range(4)}


def test_pooling_window_sees_the_whole_image() -> None:
    grid = (8, 8)
    every = {(r, c) for r in range(8) for c in range(8)}
    assert _changed(_attention(WindowLayout(grid, (4, 4), (0, 0), (4, 4))), grid, (0, 0)) == every
    assert _changed(_attention(WindowLayout(grid, (4, 4), (0, 0), None)), grid, (0, 0)) != every


@pytest.mark.parametrize("bf16", [False, True])
def test_masked_rows_stay_finite_in_training(bf16: bool) -> None:
    # 9x7 tokens in shifted 4x4 windows: padded rows 9-11 fill a whole region of the last window row, so those
    # padded queries have no real key; their rows are dropped, but a NaN there would reach the gradients of k
    # and v. bf16 on a CPU takes the explicit softmax (the fused kernel zeroes such rows by itself).
    attn = _attention(WindowLayout((9, 7), (4, 4), (2, 2), None)).train()
    x = torch.randn(2, 63, DIM, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = attn(x)
    out.float().square().mean().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in attn.parameters())


def test_explicit_bf16_path_takes_the_mask() -> None:
    layout = WindowLayout((7, 5), (4, 4), (2, 2), None)
    mask = window_mask(layout).repeat(2, 1, 1)
    q, k, v = torch.randn(3, 1, 2 * layout.num_windows, 16, 8).unbind(0)
    torch.testing.assert_close(explicit_attention(q, k, v, mask),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_checkpoints_move_between_attention_kinds() -> None:
    # The kinds differ in which keys a query sees, never in parameters: strict loads both ways.
    full = build_model("vitpose_nano", img_size=(64, 48), patch_size=8)
    for kind in ("window", "shift_window", "pool_window", "shift_pool_window"):
        win = build_model("vitpose_nano", img_size=(64, 48), patch_size=8,
                          attention={"kind": kind, "window": [4, 4]})
        win.load_state_dict(full.state_dict(), strict=True)
        full.load_state_dict(win.state_dict(), strict=True)
        assert win.num_params() == full.num_params()
        x = torch.randn(1, 3, 64, 48)
        assert win.eval()(x).shape == full.eval()(x).shape


def test_window_attention_costs_less_at_576x432() -> None:
    full = build_model("vitpose_b", device="meta", img_size=(576, 432))
    win = build_model("vitpose_b", device="meta", img_size=(576, 432),
                      attention={"kind": "shift_pool_window", "window": [8, 8]})
    assert win.flops() < full.flops()
    assert win.backbone.attention_map_bytes() < full.backbone.attention_map_bytes() / 5
    # Only the attention matmuls change: 36x27 tokens pad to 5x4 windows of 64, each query seeing its 64 and
    # the 20 pooled tokens, instead of all 972.
    assert full.flops() - win.flops() == 12 * 2 * 768 * (972**2 - 20 * 64 * (64 + 20))


def test_config_selects_the_kind_and_rejects_unknown_keys() -> None:
    from vitpose.build import model_spec
    from vitpose.config import ConfigError

    cfg = load_config(None, ["model.preset=vitpose_b", "model.img_size=[576,432]",
                             "model.attention={kind: shift_pool_window, window: [8, 8], full_blocks: [11]}"])
    spec = model_spec(cfg)
    assert spec.attention == AttentionSpec("shift_pool_window", (8, 8), None, (11,))
    with pytest.raises(ConfigError, match="model.attention.windw: unknown key.*did you mean 'model.attention.window'"):
        load_config(None, ["model.attention={kind: window, windw: [8, 8]}"])
    with pytest.raises(ConfigError, match="model.attention.full_blocks: blocks \\[12\\] do not exist"):
        load_config(None, ["model.preset=vitpose_b", "model.attention={kind: window, full_blocks: [12]}"])
