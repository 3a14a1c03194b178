"""The Gather-Scatter Mamba block (official class MambaBlock, ARCHITECTURE.md §5).

A window of K frames is gathered onto the centre frame's grid (implicit warp), flattened time-first and passed
through a bidirectional Mamba; the result is scattered back to each frame's own grid (flow warp) and added to
the un-warped window, followed by an MLP with a depthwise 3-D conv.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gsmsr.archs.bimamba import BiMamba
from gsmsr.archs.flow import warp
from gsmsr.ops import slot_warp
from gsmsr.ops.dwconv3d import dwconv3d_gelu

# (source, target, flow) -> source resampled onto target's grid: the shared ImplicitWarp or a plain flow warp
Aligner = Callable[[Tensor, Tensor, Tensor], Tensor]
# Without autograd on CUDA: the scatter's warps as one Triton kernel reading the Mamba output where it is
# (gsmsr.ops.slot_warp) instead of a channels-first fp32 copy through cuDNN's sampler and back. Same values up to
# float rounding. Measured in the network: -2.5 ms/frame (benchmarks/NOTES.md); ``--variants fscatter=0`` times it off.
FUSED_SCATTER = True


class DWConv3d(nn.Module):
    """Depthwise 3x3x3 conv; the extra level of nesting gives the official key ``mlp.dwconv.dwconv``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv3d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.dwconv(x)

    def forward_cl(self, x: Tensor, gelu: bool = False) -> Tensor:
        """Channels-last (B, K, H, W, C) -> same, followed by the exact GELU when ``gelu``. On CUDA one fused Triton
        kernel (also under torch.compile, as a custom op); elsewhere the conv on the permuted volume."""
        return dwconv3d_gelu(x, self.dwconv.weight, self.dwconv.bias, gelu)


class MlpDW(nn.Module):
    """Tokens (B, K*H*W, C) in (k, y, x) order -> fc1 -> depthwise conv over (K, H, W) -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv3d(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, k: int, h: int, w: int) -> Tensor:
        b = x.shape[0]
        x = self.dwconv.forward_cl(self.fc1(x).view(b, k, h, w, -1), gelu=True)
        return self.fc2(x.view(b, k * h * w, -1))


class GSMBlock(nn.Module):
    """One window step. Parameter names match the official ``mamba_block``."""

    def __init__(
        self,
        dim: int,
        use_checkpoint: bool = False,
        mamba_directions: int = 2,
        scan_backend: str = 'auto',
        checkpoint_mlp: bool = False,
    ) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.checkpoint_mlp = checkpoint_mlp
        self.mamba_directions = mamba_directions
        self.skip_scale = nn.Parameter(torch.ones(1, dim, 1, 1, 1))
        self.skip_scale2 = nn.Parameter(torch.ones(1, 1, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.mamba = BiMamba(dim, scan_backend=scan_backend)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MlpDW(dim, 4 * dim)
        self.apply(self._init_linear)

    @staticmethod
    def _init_linear(m: nn.Module) -> None:
        # the official init reaches the Mamba Linears too, zeroing the dt biases (§5.5, §11.12)
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def gather(self, x: Tensor, flows: List[Optional[Tensor]], align: Aligner) -> Tensor:
        """Align every slot of x (B, C, K, H, W) to the anchor's grid (the slot whose flow is None).

        The anchor goes through the warp too, with zero flow (official behaviour). All K slots are one batched
        call of the aligner.
        """
        b, c, k, h, w = x.shape
        a = [f is None for f in flows].index(True)  # not flows.index(None): no tensor == None in a traced frame
        some_flow = next(f for f in flows if f is not None)
        phi = torch.stack([torch.zeros_like(some_flow) if f is None else f for f in flows], dim=1)
        source = x.transpose(1, 2).reshape(b * k, c, h, w)
        target = x[:, :, a].unsqueeze(1).expand(b, k, c, h, w).reshape(b * k, c, h, w)
        phi = phi.reshape(b * k, 2, h, w)
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            out = checkpoint(align, source, target, phi, use_reentrant=False)
        else:
            out = align(source, target, phi)
        return out.view(b, k, c, h, w).transpose(1, 2)

    @staticmethod
    def scatter(m: Tensor, flows: List[Optional[Tensor]]) -> Tensor:
        """Warp each slot of m (B, C, K, H, W) back to its own grid (one batched warp); the anchor is not warped."""
        b, c, k, h, w = m.shape
        anchor = slot_warp.single_anchor(flows) if FUSED_SCATTER else -1
        if anchor >= 0 and not torch.is_grad_enabled() and slot_warp.runs_fused(m):
            psi = torch.stack([f for f in flows if f is not None], dim=1)
            warped = iter(slot_warp.slot_warp(m, psi, anchor).unbind(2))
            return torch.stack([m[:, :, i] if i == anchor else next(warped) for i in range(k)], dim=2)
        idx = [i for i, f in enumerate(flows) if f is not None]
        # stack, not m[:, :, idx]: a list index is a host-to-device copy, which a captured CUDA graph cannot hold
        src = torch.stack([m[:, :, i] for i in idx], dim=1).reshape(b * len(idx), c, h, w)
        psi = torch.stack([flows[i] for i in idx], dim=1).reshape(b * len(idx), 2, h, w)
        warped = iter(warp(src, psi).view(b, len(idx), c, h, w).to(m.dtype).unbind(1))
        # stack, not index_copy: an index tensor would mean a host-to-device copy per window
        return torch.stack([m[:, :, i] if f is None else next(warped) for i, f in enumerate(flows)], dim=2)

    def mamba_mix(self, g: Tensor) -> Tensor:
        """(B, C, K, H, W) -> same, tokens flattened time-first ((y, x, k) order) through LN + BiMamba."""
        b, c, k, h, w = g.shape
        tok = g.permute(0, 3, 4, 2, 1).reshape(b, h * w * k, c)
        m = self.mamba(self.norm1(tok), self.mamba_directions)
        return m.view(b, h, w, k, c).permute(0, 4, 3, 1, 2)

    def forward(
        self,
        x: Tensor,
        gather_flows: List[Optional[Tensor]],
        scatter_flows: List[Optional[Tensor]],
        align: Aligner,
        out: Optional[Tensor] = None,
    ) -> Tensor:
        """x: (B, C, K, H, W) window; flows from :func:`gsmsr.archs.flow.gather_scatter_flows`.

        out: None, or a (B, C, K, H, W) tensor of any strides and of the result's dtype (:meth:`result_dtype`) that
        the result is written into and that is returned: compiled, the write is the store of the last kernel, not a
        copy (GSMNet's streaming schedule passes slots of the next window's buffer). No autograd through it."""
        b, c, k, h, w = x.shape
        m = self.mamba_mix(self.gather(x, gather_flows, align))
        y = self.skip_scale * x + self.scatter(m, scatter_flows)
        t = y.reshape(b, c, -1).transpose(1, 2)  # (B, K*H*W, C), (k, y, x) order
        if self.checkpoint_mlp and self.training and torch.is_grad_enabled():
            t = checkpoint(self.mlp_branch, t, k, h, w, use_reentrant=False)
        else:
            t = self.mlp_branch(t, k, h, w)
        if out is None:
            return t.transpose(1, 2).reshape(b, c, k, h, w)
        if out.dtype != t.dtype:  # static when traced: no graph break
            raise TypeError(f'GSMBlock: out is {out.dtype}, the result {t.dtype} (see result_dtype)')
        # view, not unflatten: under a TorchFunctionMode (3xTF32) Dynamo 2.11 breaks the graph at Python-defined
        # Tensor methods, and the resumed frame then recompiled for every window
        return out.copy_(t.transpose(1, 2).view(b, c, k, h, w))

    def result_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """dtype of :meth:`forward`'s result for a window of ``dtype``: the skip scales promote it (under autocast
        too, where the branches come out in the lower precision and the sums do not)."""
        return torch.promote_types(torch.promote_types(dtype, self.skip_scale.dtype), self.skip_scale2.dtype)

    def mlp_branch(self, t: Tensor, k: int, h: int, w: int) -> Tensor:
        """t (B, K*H*W, C) -> skip_scale2 * t + MLP(LN(t)). Under ``checkpoint_mlp`` only t is kept for the backward,
        not the four-times-wider hidden activations."""
        return self.skip_scale2 * t + self.mlp(self.norm2(t), k, h, w)
