"""Sub-pixel form of the heads' stride-2 deconvolutions, for export: the same function as
``ConvTranspose2d(k=4, s=2, p=1)`` [+ BatchNorm + ReLU] written as a convolution on the input grid that makes
the four output phases as channels, then ``pixel_shuffle`` (ONNX DepthToSpace: CRD, or DCR where the final conv runs before it).

Why: onnxruntime's CPU provider has no int8 ConvTranspose, so an int8 export left the head (about 40% of a
student's FLOPs) in float; a Conv quantizes. Training keeps ``ConvTranspose2d`` and checkpoints are unchanged:
``subpixel_copy`` rewrites a copy of the model just before ``torch.onnx.export``.

Phase algebra (one axis): output ``o = 2i - 1 + k``, so output row ``2m + a`` takes kernel row ``k = a + 3 - 2j``
from input row ``m + j - 1`` (``j`` = 0, 1, 2; only the ``k`` within 0..3 exist: two taps per phase).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitpose.models.heads import ClassicDecoder

FORMS = ("conv3x3", "phases", "phases_final", "phases_final_grouped")
FINAL_FORMS = ("phases_final", "phases_final_grouped")  # the final 1x1 conv moved before the last shuffle


def _folded(deconv: nn.ConvTranspose2d, bn: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Deconv weight (Cin, Cout, 4, 4) and bias (Cout) with the eval-mode BatchNorm folded in, computed in
    float64 so the fold adds no rounding of its own."""
    w = deconv.weight.detach().double()
    bias = deconv.bias.detach().double() if deconv.bias is not None else w.new_zeros(w.shape[1])
    if bn is not None:
        scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
        w = w * scale.view(1, -1, 1, 1)
        bias = (bias - bn.running_mean.double()) * scale + bn.bias.detach().double()
    return w, bias


def phase_kernels(w: torch.Tensor) -> torch.Tensor:
    """(Cout, 2, 2, Cin, 3, 3): for output phase (a, b), the 3x3 correlation kernel over the input grid that the
    deconvolution ``w`` (Cin, Cout, 4, 4) amounts to; each holds 2x2 non-zero taps."""
    cin, cout = w.shape[:2]
    k = w.new_zeros(cout, 2, 2, cin, 3, 3)
    for a in range(2):
        for j in range(3):
            ka = a + 3 - 2 * j
            if not 0 <= ka < 4:
                continue
            for b in range(2):
                for i in range(3):
                    kb = b + 3 - 2 * i
                    if 0 <= kb < 4:
                        k[:, a, b, :, j, i] = w[:, :, ka, kb].t()
    return k


class _ShuffleCrop(torch.autograd.Function):
    """Pixel shuffle (block 2), then for the ``phases`` forms the one-pixel crop, exported as one DepthToSpace
    node and one Slice over both spatial axes (slicing in PyTorch exports a Slice per axis).

    ``dcr``: mode DCR, input channel ``(a*2 + b)*C + c`` is output channel ``c`` at offset (a, b); otherwise CRD,
    channel ``c*4 + a*2 + b`` (``pixel_shuffle``'s order)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dcr: bool, crop: bool) -> torch.Tensor:  # noqa: ARG004 (autograd's signature)
        if dcr:
            n, c4, h, w = x.shape
            y = x.reshape(n, 2, 2, c4 // 4, h, w).permute(0, 3, 4, 1, 5, 2).reshape(n, c4 // 4, 2 * h, 2 * w)
        else:
            y = F.pixel_shuffle(x, 2)
        return y[:, :, 1:-1, 1:-1].contiguous() if crop else y

    @staticmethod
    def symbolic(g, x, dcr, crop):  # noqa: ANN001, ANN205 (the TorchScript exporter's graph and values)
        y = g.op("DepthToSpace", x, blocksize_i=2, mode_s="DCR" if dcr else "CRD")
        if crop:
            ints = [g.op("Constant", value_t=torch.tensor(v, dtype=torch.int64)) for v in ([1, 1], [-1, -1], [2, 3])]
            y = g.op("Slice", y, *ints)
        return y


class SubpixelDeconv(nn.Module):
    """``ConvTranspose2d(k=4, s=2, p=1)`` [+ BatchNorm (eval) + ReLU] [+ 1x1 Conv] as convolution(s) then a
    pixel shuffle.

    ``form``: ``conv3x3``: one 3x3 Conv (padding 1) with 4*Cout outputs (2.25x the deconv's MACs: 5 of each
    phase's 9 taps are zero, but one large int8 Conv); ``phases``: one 2x2 Conv (padding 1) with 4*Cout
    outputs (the deconv's MACs on an (H+1, W+1) grid), shuffled, then cropped by one pixel all round;
    ``phases_final`` / ``phases_final_grouped``: ``phases`` with ``final`` (a 1x1 Conv2d after the ReLU, the
    head's ``final_layer``) applied to the four phases before the shuffle (module docstring); without
    ``final`` they are ``phases``.
    The ReLU runs before the shuffle (it commutes with a permutation), so it sits right after a Conv, where
    onnxruntime's QDQ quantizer can drop it into the Conv's int8 output.
    """

    def __init__(self, deconv: nn.ConvTranspose2d, bn: nn.BatchNorm2d | None = None, relu: bool = False,
                 form: str = "conv3x3", final: nn.Conv2d | None = None):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"form {form!r}; choose from {FORMS}")
        if final is not None and (form not in FINAL_FORMS or not _is_pointwise(final)):
            raise ValueError(f"a final conv goes with the forms {FINAL_FORMS}, and only a 1x1 one without groups")
        w, bias = _folded(deconv, bn)
        cout, cin = w.shape[1], w.shape[0]
        k, dtype = phase_kernels(w), deconv.weight.dtype
        self.form, self.relu, self.final = form, relu, None
        grouped = form == "phases_final_grouped" and final is not None
        if form == "conv3x3":
            self.conv = nn.Conv2d(cin, 4 * cout, 3, padding=1)
            self.conv.weight.data = k.reshape(4 * cout, cin, 3, 3).to(dtype)  # channel c*4 + a*2 + b: CRD order
            self.conv.bias.data = bias.repeat_interleave(4).to(dtype)
        else:
            # A 2x2 conv with padding 1 gives an (H+1, W+1) grid whose row o reads input rows o - 1, o: phase
            # a = 0 (rows m - 1, m) is at o = m, phase a = 1 (rows m, m + 1) at o = m + 1. Shuffled with the
            # phases in reverse order, output row 2m + a lands on row 2m + a + 1 of the (2H + 2) shuffled grid:
            # one crop of a one-pixel border puts all four phases in place.
            taps = k.new_zeros(cout, 2, 2, cin, 2, 2)
            for a in range(2):
                for b in range(2):
                    taps[:, 1 - a, 1 - b] = k[:, a, b, :, a : a + 2, b : b + 2]
            if grouped:  # phase-major channels p*C + c, so each of the 1x1's four groups reads one phase
                taps, phase_bias = taps.reshape(cout, 4, cin, 2, 2).transpose(0, 1), bias.repeat(4)
            else:  # CRD: channel c*4 + p
                phase_bias = bias.repeat_interleave(4)
            self.conv = nn.Conv2d(cin, 4 * cout, 2, padding=1)
            self.conv.weight.data = taps.reshape(4 * cout, cin, 2, 2).to(dtype)
            self.conv.bias.data = phase_bias.to(dtype)
        if final is not None:
            fw = final.weight.detach().double().reshape(final.out_channels, final.in_channels)
            fb = final.bias.detach().double() if final.bias is not None else fw.new_zeros(final.out_channels)
            kk = final.out_channels
            if grouped:  # group p: channels p*C + c -> p*K + k, the same K x C matrix
                self.final = nn.Conv2d(4 * cout, 4 * kk, 1, groups=4)
                self.final.weight.data = fw.repeat(4, 1).reshape(4 * kk, cout, 1, 1).to(dtype)
                self.final.bias.data = fb.repeat(4).to(dtype)
            else:  # dense, block-structured: channel c*4 + p -> k*4 + p with W[k, c], zero across phases
                self.final = nn.Conv2d(4 * cout, 4 * kk, 1)
                self.final.weight.data = torch.kron(fw, torch.eye(4, dtype=fw.dtype)).reshape(4 * kk, 4 * cout, 1, 1).to(dtype)
                self.final.bias.data = fb.repeat_interleave(4).to(dtype)
        self.dcr = grouped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.relu:
            y = F.relu(y)
        if self.final is not None:
            y = self.final(y)
        return _ShuffleCrop.apply(y, self.dcr, self.form != "conv3x3")


def _is_pointwise(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding == (0, 0)
            and m.dilation == (1, 1) and m.groups == 1)


def _is_subpixel(m: nn.Module) -> bool:
    return (isinstance(m, nn.ConvTranspose2d) and m.kernel_size == (4, 4) and m.stride == (2, 2)
            and m.padding == (1, 1) and m.output_padding == (0, 0) and m.dilation == (1, 1) and m.groups == 1)


def subpixel_sequential(seq: nn.Sequential, form: str = "conv3x3") -> nn.Sequential:
    """``seq`` with each such deconvolution, and a BatchNorm2d / ReLU right after it, replaced by one
    ``SubpixelDeconv`` (BatchNorm in eval mode: its running statistics are folded)."""
    mods, out, i = list(seq), [], 0
    while i < len(mods):
        if not _is_subpixel(mods[i]):
            out.append(mods[i])
            i += 1
            continue
        deconv, bn, relu = mods[i], None, False
        i += 1
        if i < len(mods) and isinstance(mods[i], nn.BatchNorm2d) and mods[i].track_running_stats:
            bn, i = mods[i], i + 1
        if i < len(mods) and isinstance(mods[i], nn.ReLU):
            relu, i = True, i + 1
        out.append(SubpixelDeconv(deconv, bn, relu, "phases" if form in FINAL_FORMS else form))
    return nn.Sequential(*out)


def subpixel_copy(model: nn.Module, form: str = "conv3x3") -> nn.Module:
    """A copy of ``model`` (put in eval mode) whose every ``nn.Sequential`` has its stride-2 k4 p1
    deconvolutions in sub-pixel form (with the ``*_final`` forms, each classic head's ``final_layer`` moved into
    its last one, before the shuffle); ``model`` itself is untouched. Returns ``model`` unchanged (not a copy)
    when it has none (the simple decoder)."""
    if not any(_is_subpixel(m) for m in model.modules()):
        return model
    model = copy.deepcopy(model).eval()
    if form in FINAL_FORMS:
        for head in [m for m in model.modules() if isinstance(m, ClassicDecoder)]:
            _final_before_shuffle(head, form)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Sequential) and any(_is_subpixel(m) for m in child):
                setattr(parent, name, subpixel_sequential(child, form))
    return model


def _final_before_shuffle(head: nn.Module, form: str) -> None:
    """``head`` (a ``ClassicDecoder``: ``final_layer(deconv_layers(x))``) with its last deconvolution [+ BN +
    ReLU] and the 1x1 ``final_layer`` as one ``SubpixelDeconv`` of ``form`` at the end of ``deconv_layers``, and
    ``final_layer`` an identity. Left as it is when the layers do not end that way."""
    mods = list(head.deconv_layers)
    tail = len(mods)
    if tail and isinstance(mods[tail - 1], nn.ReLU):
        tail -= 1
    if tail and isinstance(mods[tail - 1], nn.BatchNorm2d) and mods[tail - 1].track_running_stats:
        tail -= 1
    if not tail or not _is_subpixel(mods[tail - 1]) or not _is_pointwise(head.final_layer):
        return
    deconv, rest = mods[tail - 1], mods[tail:]
    bn = next((m for m in rest if isinstance(m, nn.BatchNorm2d)), None)
    relu = any(isinstance(m, nn.ReLU) for m in rest)
    last = SubpixelDeconv(deconv, bn, relu, form, final=head.final_layer)
    head.deconv_layers = nn.Sequential(*subpixel_sequential(nn.Sequential(*mods[: tail - 1]), "phases"), last)
    head.final_layer = nn.Identity()
