"""Which tokens attend to which: full attention, and the ViTPose paper's window attention (§4, "attention type").

Owns: `AttentionSpec` (the kind, stored in ModelSpec), the per-block `WindowLayout` it gives, the boolean masks
of shifted and padded windows, window partition/merge as one gather each way (one batched attention call over
all windows, no Python loop per window), and the cost model (MACs, attention-map bytes).

The kinds change only which keys a query sees, never the parameters: a full-attention checkpoint loads into a
window model and back. Window: queries attend within non-overlapping windows of the token grid (padded at the
bottom/right to whole windows; padded keys are masked). Shift: odd blocks roll the grid by half a window first,
as Swin does, with a mask so tokens brought together by the roll from opposite image borders do not attend to
each other. Pool: every window's queries also attend to average-pooled keys/values of the whole grid (one
pooled token per pool cell), which is how the paper's pooling window passes information between windows.
Knowledge tokens, which have no position, are global: every window sees them and they see every token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

KINDS: tuple[str, ...] = ("full", "window", "shift_window", "pool_window", "shift_pool_window")


def _pair(value: Any, what: str) -> tuple[int, int]:
    pair = tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{what} must be two positive token counts (h, w), got {list(value)}")
    return pair  # type: ignore[return-value]


@dataclass(frozen=True)
class AttentionSpec:
    """The attention of every block; stored with checkpoints inside ModelSpec.

    window: window size in tokens (h, w), clamped to the grid (a window >= the grid is full attention).
    pool: pooling cell in tokens for the pooled keys of pool kinds; None = the window (one token per window).
    full_blocks: blocks that keep full attention whatever the kind (ViTDet-style interleaved global blocks).
    """

    kind: str = "full"
    window: tuple[int, int] = (8, 8)
    pool: tuple[int, int] | None = None
    full_blocks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"attention kind must be one of {KINDS}, got {self.kind!r}")
        object.__setattr__(self, "window", _pair(self.window, "attention window"))
        if self.pool is not None:
            object.__setattr__(self, "pool", _pair(self.pool, "attention pool"))
        object.__setattr__(self, "full_blocks", tuple(sorted({int(b) for b in self.full_blocks})))

    @classmethod
    def coerce(cls, value: AttentionSpec | dict[str, Any] | str | None) -> AttentionSpec:
        """From a spec, its dict form (checkpoints, config) or a kind name."""
        if isinstance(value, AttentionSpec):
            return value
        if value is None:
            return cls()
        if isinstance(value, str):
            return cls(kind=value)
        unknown = sorted(set(value) - {"kind", "window", "pool", "full_blocks"})
        if unknown:
            raise ValueError(f"unknown attention fields {unknown}; valid: kind, window, pool, full_blocks")
        return cls(**value)

    @property
    def shifted(self) -> bool:
        return self.kind.startswith("shift")

    @property
    def pooled(self) -> bool:
        return "pool" in self.kind

    def layout(self, block: int, grid: tuple[int, int]) -> WindowLayout | None:
        """The windows of block `block` on a token grid; None where the block attends fully."""
        if self.kind == "full" or block in self.full_blocks:
            return None
        window = (min(self.window[0], grid[0]), min(self.window[1], grid[1]))
        if window == tuple(grid) and not self.pooled:
            return None  # one window holding the whole grid is full attention (the fused kernel does it faster)
        # Swin alternates: even blocks regular windows, odd blocks shifted by half a window. A dimension the
        # window already spans has nothing to shift.
        odd = self.shifted and block % 2 == 1
        shift = tuple(w // 2 if odd and w < g else 0 for w, g in zip(window, grid, strict=True))
        pool = (self.pool or window) if self.pooled else None
        return WindowLayout(tuple(grid), window, shift, pool)  # type: ignore[arg-type]

    def describe(self) -> str:
        if self.kind == "full":
            return "full"
        extra = f", pool {self.pool[0]}x{self.pool[1]}" if self.pooled and self.pool else ""
        full = f", full attention in blocks {list(self.full_blocks)}" if self.full_blocks else ""
        return f"{self.kind} {self.window[0]}x{self.window[1]}{extra}{full}"


@dataclass(frozen=True)
class WindowLayout:
    """One block's windowing: grid and window in tokens, shift (rows, cols) of the roll, pool cell or None."""

    grid: tuple[int, int]
    window: tuple[int, int]
    shift: tuple[int, int]
    pool: tuple[int, int] | None

    @property
    def padded(self) -> tuple[int, int]:
        return tuple(math.ceil(g / w) * w for g, w in zip(self.grid, self.window, strict=True))  # type: ignore[return-value]

    @property
    def num_windows(self) -> int:
        (ph, pw), (wh, ww) = self.padded, self.window
        return (ph // wh) * (pw // ww)

    @property
    def window_tokens(self) -> int:
        return self.window[0] * self.window[1]

    @property
    def num_pooled(self) -> int:
        if self.pool is None:
            return 0
        return math.ceil(self.grid[0] / self.pool[0]) * math.ceil(self.grid[1] / self.pool[1])

    def needs_mask(self) -> bool:
        return self.padded != self.grid or self.shift != (0, 0)


# ---- masks and partitioning ----------------------------------------------------------------------------


def _regions(size: int, window: int, shift: int) -> torch.Tensor:
    """Per rolled row (or column): which contiguous stretch of the original image it came from (Swin's labels).
    After rolling by -shift, the last `shift` rows are the image's first rows: another region."""
    labels = torch.zeros(size, dtype=torch.long)
    if shift:
        labels[size - window: size - shift] = 1
        labels[size - shift:] = 2
    return labels


def window_mask(layout: WindowLayout) -> torch.Tensor | None:
    """Bool (num_windows, L, L + num_pooled), True where a query may attend; None when nothing is masked.

    A key is visible when it is a real (not padded) token from the same region as the query; pooled keys
    are always visible.
    """
    if not layout.needs_mask():
        return None
    (gh, gw), (ph, pw), (sh, sw) = layout.grid, layout.padded, layout.shift
    valid = torch.zeros(ph, pw, dtype=torch.bool)
    valid[:gh, :gw] = True
    valid = torch.roll(valid, shifts=(-sh, -sw), dims=(0, 1))
    rows, cols = _regions(ph, layout.window[0], sh), _regions(pw, layout.window[1], sw)
    region = rows[:, None] * 3 + cols[None, :]
    region, valid = partition(region[None, None, :, :, None], layout)[0, :, :, 0], partition(
        valid[None, None, :, :, None], layout)[0, :, :, 0]  # (nW, L) each
    mask = (region[:, :, None] == region[:, None, :]) & valid[:, None, :]
    # A padded query whose region holds no real token would have no key at all (NaN softmax, and NaN gradients
    # through the dropped row); letting every query see itself keeps each row finite. Real rows are unchanged.
    mask |= torch.eye(layout.window_tokens, dtype=torch.bool)
    if layout.num_pooled:
        mask = torch.cat([mask, mask.new_ones(*mask.shape[:2], layout.num_pooled)], dim=2)
    return mask


def partition(t: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """(B, h, H, W, d) on the padded-and-rolled grid -> (B, h * num_windows, L, d), windows head-major."""
    b, h, _, _, d = t.shape
    (ph, pw), (wh, ww) = layout.padded, layout.window
    t = t.reshape(b, h, ph // wh, wh, pw // ww, ww, d).permute(0, 1, 2, 4, 3, 5, 6)
    return t.reshape(b, h * layout.num_windows, wh * ww, d)


def token_order(layout: WindowLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(window slots -> grid token, grid token -> window slot), int64 of length num_windows * L and grid h * w.

    Slot `s` of the flattened windows (row-major windows, row-major inside each) holds grid token `into[s]` of the
    padded-and-rolled grid; padded slots hold token 0, which `window_mask` hides as a key and whose query rows are
    never read back. `back[n]` is the slot of grid token n. Both come from `partition`, so they match the mask.
    """
    (gh, gw), (ph, pw), (sh, sw) = layout.grid, layout.padded, layout.shift
    ids = torch.zeros(ph, pw, dtype=torch.long)
    ids[:gh, :gw] = torch.arange(gh * gw).reshape(gh, gw)
    real = torch.zeros(ph, pw, dtype=torch.bool)
    real[:gh, :gw] = True
    ids, real = (partition(torch.roll(t, shifts=(-sh, -sw), dims=(0, 1))[None, None, :, :, None], layout).flatten()
                 for t in (ids, real))
    back = torch.empty(gh * gw, dtype=torch.long)
    back[ids[real]] = torch.nonzero(real).flatten()
    return ids, back


_ORDERS: dict[tuple[WindowLayout, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _order_on(layout: WindowLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (layout, device)
    if key not in _ORDERS:
        _ORDERS[key] = tuple(t.to(device) for t in token_order(layout))  # type: ignore[assignment]
    return _ORDERS[key]


def to_windows(t: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """Grid tokens (B, h, N, d), any strides -> windows (B * num_windows, h, L, d), window-major.

    One gather does the padding, the roll and the partition: a single copy of the tensor whatever the layout
    (pad + roll + permute took up to three). The result is laid out (B * nW, L, h, d) in memory, the layout of
    q, k and v in full attention, which the fused kernels take as it is.
    """
    b, h, _, d = t.shape
    into = _order_on(layout, t.device)[0]
    w = t.transpose(1, 2).index_select(1, into)  # (B, nW * L, h, d)
    return w.reshape(b * layout.num_windows, layout.window_tokens, h, d).transpose(1, 2)


def from_windows(t: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """Inverse of `to_windows`: (B * num_windows, h, L, d) -> (B, N, h, d) contiguous, padding dropped.

    (B, N, h, d) is the memory layout the block's output projection reads, so merging the heads after this is a
    view; from the fused kernel's output (laid out (B * nW, L, h, d)) this is one gather.
    """
    bw, h, length, d = t.shape
    back = _order_on(layout, t.device)[1]
    return t.transpose(1, 2).reshape(bw // layout.num_windows, layout.num_windows * length, h, d).index_select(1, back)


def pool_matrix(layout: WindowLayout) -> torch.Tensor:
    """(P, N) float64: row p averages the grid tokens of pool cell p (row-major cells); a cell cut by the border
    averages only its real tokens (avg_pool2d's ceil_mode divisor)."""
    assert layout.pool is not None
    (gh, gw), (ch, cw) = layout.grid, layout.pool
    rows, cols = torch.arange(gh).repeat_interleave(gw), torch.arange(gw).repeat(gh)
    cell = (rows // ch) * math.ceil(gw / cw) + cols // cw
    a = F.one_hot(cell, layout.num_pooled).T.double()
    return a / a.sum(1, keepdim=True)


_POOLS: dict[tuple[WindowLayout, torch.device, torch.dtype], torch.Tensor] = {}


def pooled_tokens(t: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """(B, h, N, d) -> (B, h, P, d): the average of each pool cell of the (unpadded) grid.

    A matmul with the constant `pool_matrix`, whose backward keeps only that matrix: avg_pool2d kept its input, a
    grid-ordered copy of k or v (or the whole qkv output it was a view of) per block.
    """
    key = (layout, t.device, t.dtype)
    if key not in _POOLS:
        _POOLS[key] = pool_matrix(layout).to(t.dtype).to(t.device)
    b, h, _, d = t.shape
    pooled = torch.matmul(_POOLS[key], t.transpose(1, 2).flatten(2))  # (B, P, h * d)
    return pooled.unflatten(2, (h, d)).transpose(1, 2)


# ---- attention ------------------------------------------------------------------------------------------


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v as two batched matmuls: the bf16 training path on CPUs.

    In bf16 on a CPU the fused kernel's forward + backward is slow for pose-sized sequences, while the two
    batched matmuls run on the matrix units (AMX), about twice as fast per block at ViT-B shapes
    (benchmarks/RESULTS.md, benchmarks.window_attention). The price is the usual one of
    mixed-precision attention without a fused kernel: the scores are rounded to bf16 before the softmax
    (which accumulates in fp32), and the backward pass keeps the (B, h, N, N) probabilities (14 MB per
    ViT-B block at batch 16). Inference and fp32 keep the fused kernel.
    """
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention, the explicit form for bf16 training on CPUs (see explicit_attention)."""
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and torch.is_grad_enabled():
        return explicit_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: WindowLayout,
                     mask: torch.Tensor | None) -> torch.Tensor:
    """(B, h, N + K, d) each -> (B, h, N + K, d): N grid tokens in windows, K global (knowledge) tokens.

    `mask` is `window_mask(layout)` (on the device); windows are batched into one attention call as
    (B * num_windows, h, L, d). The result is laid out (B, N + K, h, d) in memory (a transposed view), so the
    caller's `out.transpose(1, 2).reshape(B, N + K, h * d)` costs no copy.
    """
    b, heads, n, d = q.shape
    grid_n = layout.grid[0] * layout.grid[1]
    n_win = layout.num_windows
    extra_k, extra_v = k[:, :, grid_n:], v[:, :, grid_n:]  # knowledge tokens: keys for every window
    if layout.pool is not None:
        extra_k = torch.cat([pooled_tokens(k[:, :, :grid_n], layout), extra_k], dim=2)
        extra_v = torch.cat([pooled_tokens(v[:, :, :grid_n], layout), extra_v], dim=2)
    qw, kw, vw = (to_windows(t[:, :, :grid_n], layout) for t in (q, k, v))
    n_extra = extra_k.shape[2]
    if n_extra:
        def per_window(t: torch.Tensor) -> torch.Tensor:
            return t.unsqueeze(1).expand(-1, n_win, -1, -1, -1).reshape(b * n_win, heads, n_extra, d)

        kw, vw = torch.cat([kw, per_window(extra_k)], dim=2), torch.cat([vw, per_window(extra_v)], dim=2)
    if mask is not None:
        if mask.shape[-1] < kw.shape[2]:  # knowledge tokens after the pooled keys: visible to all
            mask = torch.cat([mask, mask.new_ones(*mask.shape[:2], kw.shape[2] - mask.shape[-1])], dim=2)
        mask = mask.repeat(b, 1, 1).unsqueeze(1)  # (B * nW, 1, L, S): the same windows for every head
    out = from_windows(attend(qw, kw, vw, mask), layout)  # (B, N, h, d)
    if n > grid_n:  # the global tokens' own queries see everything
        out = torch.cat([out, attend(q[:, :, grid_n:], k, v).transpose(1, 2)], dim=1)
    return out.transpose(1, 2)


# ---- cost -----------------------------------------------------------------------------------------------


def attention_cost(layout: WindowLayout | None, grid_n: int, extra: int, dim: int, heads: int) -> tuple[int, int]:
    """(MACs of q k^T and attn v, entries of the attention maps) of one block for one image.

    Counts what is computed: padded window queries included. Entries times the element size is what an
    explicit softmax keeps for the backward pass (the paper's memory figures; fused kernels keep O(N))."""
    t = grid_n + extra
    if layout is None:
        return 2 * t * t * dim, heads * t * t
    length, keys = layout.window_tokens, layout.window_tokens + layout.num_pooled + extra
    queries = layout.num_windows * length
    entries = queries * keys + extra * t
    return 2 * entries * dim, heads * entries
