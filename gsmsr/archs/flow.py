"""Optical flow for GSM: SpyNet on adjacent frames, flow composition, and each window's gather/scatter flows.

Notation (ARCHITECTURE.md §0, §2, §5.2): ``F[a->b]`` lives on frame a's grid and points into frame b.
``flows_backward[:, t] = F[t->t+1]`` and ``flows_forward[:, t] = F[t+1->t]``; channel 0 is x.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from basicsr.archs.arch_util import flow_warp
from basicsr.archs.spynet_arch import SpyNet
from torch import Tensor


def warp(x: Tensor, flow: Tensor) -> Tensor:
    """Backward warp: sample ``x`` (N, C, H, W) at ``p + flow(p)``, flow (N, 2, H, W); zeros outside.

    BasicSR's flow_warp builds its pixel grid in ``x``'s dtype; a bf16 grid cannot even hold column 257, so
    half-precision features are warped in fp32 (the result is fp32).
    """
    if x.dtype.itemsize < 4:
        x = x.float()
    return flow_warp(x, flow.permute(0, 2, 3, 1), interp_mode='bilinear', padding_mode='zeros', align_corners=True)


def compose(phi: Tensor, g: Tensor) -> Tensor:
    """``phi + Wp(g; phi)``: follow ``phi``, then ``g`` read where ``phi`` lands."""
    return phi + warp(g, phi)


def load_spynet_weights(spynet: SpyNet, path: str) -> None:
    """Load BasicSR's SpyNet checkpoint (under ``params``, ``state_dict`` or bare) strictly into ``spynet``."""
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    for key in ('params', 'state_dict'):
        if isinstance(ckpt, dict) and key in ckpt:
            ckpt = ckpt[key]
            break
    weights = {k: v for k, v in ckpt.items() if k not in ('mean', 'std')}  # buffers, recomputed
    unexpected = [k for k in weights if not k.startswith('basic_module.')]
    if unexpected:
        raise ValueError(f'{path}: not a SpyNet checkpoint: unexpected keys {", ".join(unexpected[:10])}')
    try:
        spynet.basic_module.load_state_dict({k[len('basic_module.') :]: v for k, v in weights.items()}, strict=True)
    except RuntimeError as err:
        raise ValueError(f'{path}: not a SpyNet checkpoint: {err}') from err


def adjacent_flows(spynet: SpyNet, lq: Tensor) -> Tuple[Tensor, Tensor]:
    """lq: (B, T, 3, H, W) -> (flows_backward, flows_forward), each (B, T-1, 2, H, W), in fp32 or wider."""
    b, t, c, h, w = lq.shape
    frames = lq.float() if lq.dtype.itemsize < 4 else lq
    with torch.autocast(lq.device.type, enabled=False):
        ref = frames[:, :-1].reshape(-1, c, h, w)
        supp = frames[:, 1:].reshape(-1, c, h, w)
        backward = spynet(ref, supp).view(b, t - 1, 2, h, w)
        forward = spynet(supp, ref).view(b, t - 1, 2, h, w)
    return backward, forward


def window_link_flows(fb: Tensor, ff: Tensor, start: int, k: int) -> Tuple[List[Tensor], List[Tensor]]:
    """Link flows between consecutive slots of the K-frame window whose slot 0 is frame ``start`` (§4.4).

    fb, ff: (B, T-1, 2, H, W) in the layer's own time order. Returns lists of K-1 fields (B, 2, H, W):
    ``lb[i] = F[i->i+1]`` and ``lf[i] = F[i+1->i]`` in slot indices; zero where a slot is an edge copy.
    """
    n = fb.shape[1]  # T - 1
    zero = fb.new_zeros(fb[:, 0].shape)
    lb, lf = [], []
    for i in range(k - 1):
        s = start + i
        valid = 0 <= s <= n - 1
        lb.append(fb[:, s] if valid else zero)
        lf.append(ff[:, s] if valid else zero)
    return lb, lf


def gather_scatter_flows(
    lb: List[Tensor], lf: List[Tensor], anchor: int, compose_order: str = 'official'
) -> Tuple[List[Optional[Tensor]], List[Optional[Tensor]]]:
    """Gather flows ``phi_i`` (anchor grid -> slot i) and scatter flows ``psi_i`` (slot i -> anchor), §5.2.

    ``None`` marks the anchor (gather: zero flow, scatter: no warp). ``compose_order='official'`` chains the
    hops in the trained (reversed) order; ``'geometric'`` in the textbook order (§11.1).
    """
    k = len(lb) + 1
    official = compose_order == 'official'

    def chain(legs: List[Tensor]) -> Tensor:
        # official: phi = compose(phi, next leg); geometric: phi = compose(next leg, phi)
        phi = legs[0]
        for g in legs[1:]:
            phi = compose(phi, g) if official else compose(g, phi)
        return phi

    gather: List[Optional[Tensor]] = [None] * k
    scatter: List[Optional[Tensor]] = [None] * k
    c = anchor
    for i in range(k):
        if i < c:
            gather[i] = chain([lf[j] for j in range(i, c)])
            scatter[i] = chain([lb[j] for j in range(c - 1, i - 1, -1)])
        elif i > c:
            gather[i] = chain([lb[j] for j in range(i - 1, c - 1, -1)])
            scatter[i] = chain([lf[j] for j in range(c, i)])
    return gather, scatter
