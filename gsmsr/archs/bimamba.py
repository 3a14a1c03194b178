"""Bidirectional Mamba of Vision Mamba ("v2"), as GSM uses it (ARCHITECTURE.md §5.5).

One shared input and output projection; a forward and a backward branch with their own causal conv, x/dt
projections, A and D; the backward branch runs on the time-flipped sequence (gate included), and the two
outputs are summed, not averaged. Parameter names match the official checkpoint.

Without autograd, where the scan walks time backwards itself (:func:`gsmsr.ops.selective_scan.reverses_natively`),
the backward branch runs on the unflipped sequence instead: an anti-causal conv, the pointwise-in-time projections
as they are, and a reverse scan. The same value, without the flipped copies of x and the gate that the scans (opaque
custom ops under ``torch.compile``) would need. There the two scans also run ungated and the gate multiplies their
sum once (``GATE_OUTSIDE``): since ``(y_f + y_b) * g = y_f * g + y_b * g``, the same value to rounding.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gsmsr.ops.selective_scan import reverses_natively, selective_scan

D_STATE = 16
D_CONV = 4
EXPAND = 2
# The flip-free backward branch without autograd (see the module docstring): -1.3 ms/frame on an H200 at 20x180x320
# (benchmarks/NOTES.md); False keeps the flipped form everywhere, and bench_gsm's ``--variants flipfree=0`` times it.
FLIP_FREE = True
# On the flip-free path, the output gate once on the two branches' sum, in float32 in the op that adds them, instead
# of inside each scan: the output passes lose 2 of their 19 special-function ops and 16 of their 154 instructions a
# token (offline SASS) and the gate's loads (read once instead of twice); one rounding fewer (each branch was rounded
# to the activations' dtype after its gate). 39.0 against 40.3 ms/frame for the bf16 compiled default at 20x180x320
# on an H200, the scan 10.4 against 11.4 ms/frame, output moved by 9.8e-4 (benchmarks/NOTES.md); ``bench_gsm.py
# --variants gate=0`` times the gate inside.
GATE_OUTSIDE = True


@cache
def _causal_conv1d_fn() -> Optional[Callable]:
    """causal-conv1d's CUDA kernel if installed (``pip install gsmsr[cuda]``), else None."""
    try:
        from causal_conv1d import causal_conv1d_fn

        return causal_conv1d_fn
    except ImportError:
        return None


def causal_conv_silu_shifted(x: Tensor, weight: Tensor, bias: Tensor, reverse: bool = False) -> Tensor:
    """:func:`causal_conv_silu` as k shifted multiply-adds, which Inductor fuses with the SiLU (and with the time
    flip of the backward branch) into one pass. reverse: anti-causal, with the products added in the order of the
    causal conv on the flipped x, so equal to it (flipped back) bit for bit."""
    k = weight.shape[-1]
    length = x.shape[-1]
    xp = F.pad(x, (0, k - 1) if reverse else (k - 1, 0))
    w = weight.squeeze(1).to(x.dtype)
    out = bias.to(x.dtype)[:, None]
    for i in range(k):
        start = k - 1 - i if reverse else i  # tap i weighs x[t - (k-1) + i], reversed x[t + (k-1) - i]
        out = out + xp[..., start : start + length] * w[:, i : i + 1]
    return F.silu(out)


def causal_conv_silu(x: Tensor, weight: Tensor, bias: Tensor, reverse: bool = False) -> Tensor:
    """Depthwise causal conv (left zero padding) followed by SiLU. x: (B, D, L); weight: (D, 1, k).
    reverse: anti-causal (right zero padding), ``causal_conv_silu(x.flip(-1), weight, bias).flip(-1)``.

    causal-conv1d's kernel when installed (flipped around, as it has no anti-causal mode), the shifted-sum form
    under ``torch.compile``, else a grouped conv1d."""
    if torch.compiler.is_compiling():
        return causal_conv_silu_shifted(x, weight, bias, reverse)
    k = weight.shape[-1]
    kernel = _causal_conv1d_fn() if x.is_cuda and x.dtype != torch.float64 else None
    if kernel is not None and reverse:
        return kernel(x.flip(-1), weight.squeeze(1), bias, activation='silu').flip(-1)
    if kernel is not None:
        return kernel(x.contiguous(), weight.squeeze(1), bias, activation='silu')
    if reverse:  # cross-correlation with the taps reversed, zeros on the right
        return F.silu(F.conv1d(F.pad(x, (0, k - 1)), weight.flip(-1), bias, groups=x.shape[1]))
    return F.silu(F.conv1d(x, weight, bias, padding=k - 1, groups=x.shape[1])[..., : x.shape[-1]])


def _at_least_fp32(t: Tensor) -> Tensor:
    return t.float() if t.dtype.itemsize < 4 else t


class BiMamba(nn.Module):
    """(B, L, C) -> (B, L, C)."""

    def __init__(
        self,
        d_model: int,
        d_state: int = D_STATE,
        d_conv: int = D_CONV,
        expand: int = EXPAND,
        scan_backend: str = 'auto',
    ) -> None:
        super().__init__()
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = math.ceil(d_model / 16)
        self.scan_backend = scan_backend
        di, r = self.d_inner, self.dt_rank
        a_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(di, 1)
        self.A_log = nn.Parameter(a_log.clone())
        self.D = nn.Parameter(torch.ones(di))
        self.A_b_log = nn.Parameter(a_log.clone())
        self.D_b = nn.Parameter(torch.ones(di))
        self.in_proj = nn.Linear(d_model, 2 * di, bias=False)
        self.conv1d = nn.Conv1d(di, di, d_conv, groups=di, padding=d_conv - 1)
        self.x_proj = nn.Linear(di, r + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(r, di)
        self.conv1d_b = nn.Conv1d(di, di, d_conv, groups=di, padding=d_conv - 1)
        self.x_proj_b = nn.Linear(di, r + 2 * d_state, bias=False)
        self.dt_proj_b = nn.Linear(r, di)
        self.out_proj = nn.Linear(di, d_model, bias=False)
        self._init_dt(self.dt_proj)

    def _init_dt(self, dt_proj: nn.Linear, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        # Vim's init for the forward branch; GSM's block init overwrites every Linear anyway (§5.5).
        nn.init.uniform_(dt_proj.weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        with torch.no_grad():
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def _branch(
        self,
        x: Tensor,
        gate: Optional[Tensor],
        conv: nn.Conv1d,
        x_proj: nn.Linear,
        dt_proj: nn.Linear,
        a_log: Tensor,
        d: Tensor,
        reverse: bool = False,
    ) -> Tensor:
        """x, gate: (B, Di, L) -> (B, Di, L). reverse: conv and scan run time backwards (anti-causal conv, reverse
        scan), i.e. the branch on the flipped x and gate, flipped back. gate None: the ungated output."""
        u = causal_conv_silu(x, conv.weight, conv.bias, reverse)
        A = -torch.exp(_at_least_fp32(a_log))
        bias = _at_least_fp32(dt_proj.bias)
        split = [self.dt_rank, self.d_state, self.d_state]
        # channels-first: every scan operand has unit stride along L (B and C are views of x_proj's output; eagerly no
        # copies, under torch.compile Inductor copies delta, B and C into this layout)
        delta, b, c = torch.matmul(x_proj.weight, u).split(split, dim=1)  # (B, R + 2N, L)
        delta = torch.matmul(dt_proj.weight, delta)  # (B, Di, L); dt bias goes into the scan
        return selective_scan(
            u,
            delta,
            A,
            b,
            c,
            _at_least_fp32(d),
            gate,
            bias,
            delta_softplus=True,
            backend=self.scan_backend,
            reverse=reverse,
        )

    def forward(self, z: Tensor, directions: int = 2) -> Tensor:
        """z: (B, L, C) -> (B, L, C)."""
        # Without autograd, where the scan walks backwards itself, the backward branch runs on the sequence as it is:
        # anti-causal conv, reverse scan (the projections are pointwise in time). Autograd keeps the flipped form,
        # whose backward kernels are the forward branch's.
        flip_free = (
            FLIP_FREE and directions == 2 and not torch.is_grad_enabled() and reverses_natively(z, self.scan_backend)
        )
        if flip_free:
            # a bmm writes (B, 2Di, L) itself, so under torch.compile x and the gate are read straight from the GEMM's
            # output; Inductor computes the matmul below as (B*L, 2Di) and copies the scans' operands into this layout
            # (a custom op gets its operands in the eager layout)
            xz = torch.bmm(self.in_proj.weight.expand(z.shape[0], -1, -1), z.transpose(1, 2))
        else:
            xz = torch.matmul(self.in_proj.weight, z.transpose(1, 2))  # (B, 2Di, L), contiguous along L
        x, gate = xz.chunk(2, dim=1)
        gate_once = flip_free and GATE_OUTSIDE  # the gate on the two branches' float32 sum
        scan_gate = None if gate_once else gate
        y = self._branch(x, scan_gate, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        backward = (self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b)
        if flip_free:
            y_b = self._branch(x, scan_gate, *backward, reverse=True)
        elif directions == 2:
            y_b = self._branch(x.flip(-1), gate.flip(-1), *backward).flip(-1)
        if gate_once:
            y = ((y.float() + y_b.float()) * F.silu(gate.float())).to(y.dtype)
        elif directions == 2:
            y = y + y_b
        return self.out_proj(y.transpose(1, 2))
