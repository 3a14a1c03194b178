"""Shifted window self-attention (SWSA), the spatial stage of every propagation layer (ARCHITECTURE.md §4.3).

Pure 3-D (T, H, W) window self-attention with a relative position bias and a GEGLU MLP. The official quirks
are kept: padded tokens take part in the softmax, and windows smaller than nominal use the top-left slice of
the nominal relative-position index.
"""

from __future__ import annotations

import functools
import itertools
import math
from functools import lru_cache
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

Size3 = Tuple[int, int, int]

WINDOW: Size3 = (2, 8, 8)
SHIFT: Size3 = (1, 4, 4)


def effective_window(size: Sequence[int], window: Sequence[int], shift: Sequence[int]) -> Tuple[Size3, Size3]:
    """Window and shift actually used for a (T, H, W) volume: an axis no longer than the window is one window."""
    ws, ss = list(window), list(shift)
    for i in range(3):
        if size[i] <= window[i]:
            ws[i], ss[i] = size[i], 0
    return tuple(ws), tuple(ss)


def window_partition(x: Tensor, ws: Size3) -> Tensor:
    """(B, D, H, W, C) -> (B*nW, wd*wh*ww, C); windows and tokens in (d, h, w) row-major order."""
    b, d, h, w, c = x.shape
    x = x.view(b, d // ws[0], ws[0], h // ws[1], ws[1], w // ws[2], ws[2], c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, ws[0] * ws[1] * ws[2], c)


def window_merge(windows: Tensor, ws: Size3, b: int, d: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`window_partition`: (B*nW, n, C) -> (B, D, H, W, C)."""
    x = windows.view(b, d // ws[0], h // ws[1], w // ws[2], ws[0], ws[1], ws[2], -1)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, d, h, w, -1)


@lru_cache(maxsize=4)
def _shift_labels(padded: Size3, ws: Size3, ss: Size3, device: torch.device) -> Tensor:
    label = torch.zeros(1, *padded, 1, dtype=torch.int32, device=device)
    regions = [
        (slice(0, n - w), slice(n - w, n - s), slice(n - s, n)) if s > 0 else (slice(0, n),)
        for n, w, s in zip(padded, ws, ss)
    ]
    count = 0
    for sd in regions[0]:
        for sh in regions[1]:
            for sw in regions[2]:
                label[:, sd, sh, sw, :] = count
                count += 1
    return window_partition(label, ws).squeeze(-1)  # (nW, n)


def shift_labels(padded: Size3, ws: Size3, ss: Size3, device: torch.device) -> Tensor:
    """(nW, n) int32 region id of every token of every window: tokens of different regions were brought together by
    the cyclic shift and must not attend to each other (see :func:`label_mask`).

    Cached per (size, device): built once, not copied to the device at every call."""
    return _shift_labels(tuple(padded), tuple(ws), tuple(ss), torch.device(device))


def label_mask(labels: Tensor, dtype: torch.dtype) -> Tensor:
    """Region ids (w, n) -> additive mask (w, n, n): -100.0 between tokens of different regions, else 0.

    -100.0, not -inf, is the official value: a masked score keeps a weight of about exp(-100)."""
    differ = labels.unsqueeze(1) != labels.unsqueeze(2)
    return torch.zeros(differ.shape, dtype=dtype, device=labels.device).masked_fill(differ, -100.0)


def relative_position_index(window: Size3 = WINDOW) -> Tensor:
    """(n, n) int64 index into the (2wd-1)(2wh-1)(2ww-1) bias table, n = wd*wh*ww."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(s) for s in window], indexing='ij')).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    rel = rel + torch.tensor([s - 1 for s in window])
    strides = torch.tensor([(2 * window[1] - 1) * (2 * window[2] - 1), 2 * window[2] - 1, 1])
    return (rel * strides).sum(-1)


def window_attention_ref(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, labels: Optional[Tensor], scale: float
) -> Tensor:
    """Explicit window attention, the readable reference: softmax(q k^T * scale + bias + shift mask) v.

    q, k, v: (w, heads, n, d); bias: (heads, n, n); labels: (L, n) shift-region ids with window i using
    labels[i % L] (w a multiple of L), or None for unshifted windows. Returns (w, heads, n, d). Holds the
    (w, heads, n, n) scores: callers bound w."""
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = attn + bias.unsqueeze(0)
    if labels is not None:
        if q.shape[0] > labels.shape[0]:
            labels = labels.repeat(q.shape[0] // labels.shape[0], 1)
        attn = attn + label_mask(labels, attn.dtype).unsqueeze(1)
    return attn.softmax(dim=-1) @ v


SDPA_MAX_WINDOWS = 32768  # windows a call of SDPA: its fused kernels put the batch in a grid dimension of <= 65,535


def _sdpa_windows(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """SDPA over (w, heads, n, d) windows with one (1, heads, n, n) additive mask, SDPA_MAX_WINDOWS at a time."""
    step = SDPA_MAX_WINDOWS
    parts = [F.scaled_dot_product_attention(*(t[i : i + step] for t in (q, k, v)), attn_mask=mask, scale=scale)
             for i in range(0, q.shape[0], step)]  # fmt: skip
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def window_attention_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor,
    labels: Optional[Tensor],
    scale: float,
    grid: Tuple[int, int, int, int],
    shifted_axes: Sequence[int],
) -> Tensor:
    """:func:`window_attention_ref`'s values through ``F.scaled_dot_product_attention`` (its fused kernel: no
    (w, heads, n, n) scores in memory), each mask broadcast over the windows that share it. grid: (B, Dw, Hw, Ww),
    the windows' layout (w = B * Dw * Hw * Ww, row-major as :func:`window_partition` orders them); labels:
    (Dw*Hw*Ww, n) region ids of shifted windows, or None. A window holds tokens of several regions only where it is
    the last along a shifted axis (the cyclic shift's wrap-around: :func:`shift_labels`), and the windows that are
    last along the same set of shifted axes hold the same regions. So all windows run with the bias alone as the
    mask, then each such set (at most 7) is redone with the bias plus its one region mask."""
    o = _sdpa_windows(q, k, v, bias.unsqueeze(0).to(q.dtype), scale)
    if labels is None or not shifted_axes:
        return o
    tail = q.shape[1:]
    q, k, v, o = (t.view(*grid, *tail) for t in (q, k, v, o))
    lab = labels.view(*grid[1:], labels.shape[-1])
    for last in itertools.product((False, True), repeat=len(shifted_axes)):
        at = dict(zip(shifted_axes, last))  # axis -> last window (True) or all others (False)
        if not any(last) or any(not end and grid[1 + a] == 1 for a, end in at.items()):  # done above / no windows
            continue
        sel = tuple(slice(None) if a not in at else (-1 if at[a] else slice(0, -1)) for a in range(3))
        one = lab[tuple(-1 if at.get(a) else 0 for a in range(3))]  # (n,) the regions of every window of the set
        mask = (bias + label_mask(one.unsqueeze(0), bias.dtype)).to(q.dtype)
        part = _sdpa_windows(*(t[(slice(None), *sel)].reshape(-1, *tail) for t in (q, k, v)), mask, scale)
        o[(slice(None), *sel)] = part.view(o[(slice(None), *sel)].shape)
    return o.view(-1, *tail)


# SDPA (window_attention_sdpa) for the bf16 SWSA blocks without autograd: -4.7 ms/frame in the network
# (benchmarks/NOTES.md; bench_gsm's ``--variants sdpa=0`` times it off).
SDPA_ATTENTION = True


def use_sdpa(x: Tensor) -> bool:
    """Whether window attention takes :func:`window_attention_sdpa`: CUDA, half precision (bf16 autocast), no
    autograd. In fp32 SDPA's kernel lost to the explicit form (bench_attn.py)."""
    half = torch.get_autocast_dtype('cuda') if torch.is_autocast_enabled('cuda') else x.dtype
    return SDPA_ATTENTION and x.is_cuda and half.itemsize == 2 and not torch.is_grad_enabled()


class WindowAttention(nn.Module):
    """Multi-head self-attention inside one window, with relative position bias.

    Keys ``qkv_self``, ``proj``, ``relative_position_bias_table`` and the persistent ``relative_position_index``
    buffer match the official checkpoint.
    """

    def __init__(self, dim: int, num_heads: int, window: Size3 = WINDOW) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        table_size = (2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table_size, num_heads))
        self.register_buffer('relative_position_index', relative_position_index(window))
        self.qkv_self = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    # windows attended per step by the explicit path without autograd (fp32): bounds its (windows, heads, n, n)
    # scores and their softmax, both held at once (2 x 268 MB at 8 heads and 128 tokens, fp32); the SDPA path never
    # holds them. 512: the fp32 network's peak at 100 x 180 x 320 is an SWSA slab's (10.50 GiB on an H200, the
    # window steps' 8.32), and 1024 windows held ~0.7 GiB more in scores, softmax and q|k|v
    max_windows = 512
    # the same with autograd (training): the value the training step was measured with
    max_windows_grad = 1024

    def forward(
        self,
        x: Tensor,
        labels: Optional[Tensor] = None,
        grid: Optional[Tuple[int, int, int, int]] = None,
        shifted_axes: Sequence[int] = (),
    ) -> Tensor:
        """x: (B*nW, n, C); labels: (nW, n) shift-region ids (:func:`shift_labels`), or None for unshifted windows;
        window i of the batch uses labels[i % nW]. grid, shifted_axes: the windows' (B, Dw, Hw, Ww) and the shifted
        axes (0-2), for :func:`window_attention_sdpa` (without them the explicit path runs; with them SDPA attends all
        windows in one part: :meth:`SWSABlock.sdpa_parts` cuts large volumes). Returns (B*nW, n, C)."""
        if grid is not None and use_sdpa(x):
            return self._sdpa(x, labels, grid, shifted_axes)
        bias = self.position_bias(x.shape[1])
        bw = x.shape[0]
        if labels is not None and bw > labels.shape[0]:
            labels = labels.repeat(bw // labels.shape[0], 1)
        # windows are independent: slices give the same values in bounded memory
        step = self.max_windows_grad if torch.is_grad_enabled() else self.max_windows
        parts = [
            self._attend(x[s : s + step], bias, None if labels is None else labels[s : s + step], window_attention_ref)
            for s in range(0, bw, step)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    # windows a part of the SDPA path (projections and attention) at most, where a window plane is smaller: bounds
    # its q, k, v (~9 GiB at 65,536 windows of 128 tokens, C = 192, bf16), e.g. 20 frames of 1080p hold 324,000
    # windows (SWSABlock.sdpa_parts)
    sdpa_part_windows = 65536

    def attend_part(
        self, x: Tensor, labels: Optional[Tensor], grid: Tuple[int, int, int, int], shifted_axes: Sequence[int]
    ) -> Tensor:
        """One part of a large volume (:meth:`SWSABlock.attend_in_parts`), compiled on its own: :meth:`_sdpa`.
        (Compiling replaces this method on the instance; the code traced for the whole residual calls :meth:`_sdpa`.)"""
        return self._sdpa(x, labels, grid, shifted_axes)

    def attend_chunk(self, x: Tensor, labels: Optional[Tensor]) -> Tensor:
        """One step of the explicit path (at most :attr:`max_windows` windows), compiled on its own: x (w, n, C),
        labels (w, n) or None -> (w, n, C) (:meth:`SWSABlock.attend_in_chunks`)."""
        return self._attend(x, self.position_bias(x.shape[1]), labels, window_attention_ref)

    def _sdpa(
        self, x: Tensor, labels: Optional[Tensor], grid: Tuple[int, int, int, int], shifted_axes: Sequence[int]
    ) -> Tensor:
        """:meth:`_attend` through :func:`window_attention_sdpa` over windows laid out as ``grid``; x: (w, n, C)."""
        sdpa = functools.partial(window_attention_sdpa, grid=grid, shifted_axes=shifted_axes)
        return self._attend(x, self.position_bias(x.shape[1]), labels, sdpa)

    def _attend(self, x: Tensor, bias: Tensor, labels: Optional[Tensor], core: Callable[..., Tensor]) -> Tensor:
        """x: (w, n, C) -> (w, n, C): qkv projection, ``core`` (:func:`window_attention_ref`, or
        :func:`window_attention_sdpa` bound to its windows) over the heads, output projection."""
        bw, n, c = x.shape
        q, k, v = self.qkv_self(x).view(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        o = core(q, k, v, bias, labels, self.scale)
        return self.proj(o.transpose(1, 2).reshape(bw, n, c))

    def position_bias(self, n: int) -> Tensor:
        """(heads, n, n) relative position bias, contiguous. Windows smaller than nominal use the top-left slice of
        the nominal index (official behaviour)."""
        idx = self.relative_position_index[:n, :n].reshape(-1)
        return self.relative_position_bias_table[idx].view(n, n, -1).permute(2, 0, 1).contiguous()


class GEGLU(nn.Module):
    """``fc2(gelu(fc11(x)) * fc12(x))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc11 = nn.Linear(dim, hidden)
        self.fc12 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc11(x)) * self.fc12(x))


def ffn_branch(norm: nn.LayerNorm, mlp: GEGLU, x: Tensor) -> Tensor:
    """The GEGLU branch of a normalised x (..., C). A function of the two modules rather than a block method, so that
    one compiled graph serves every SWSA block, shifted or not."""
    return mlp(norm(x))


def ffn_residual(norm: nn.LayerNorm, mlp: GEGLU, x: Tensor) -> None:
    """``x += ffn_branch(norm, mlp, x)``, in place: the no-grad per-token residual, compiled with its add. x is a slice
    of SWSA's volume in that volume's layout (a whole clip: the stored frames, channels strided by T*H*W) and the
    branch's output is channels-last, so an eager ``+=`` (PyTorch's elementwise kernel, which does not tile) would read
    one of the two across its layout; in the graph Inductor tiles the transposing add (benchmarks/NOTES.md)."""
    x += ffn_branch(norm, mlp, x)


FFN_TOKENS = 65536  # tokens of the no-grad per-token branch at a time: bounds its two (tokens, 2C) hidden tensors


def ffn_frames(frames: int, pixels: int) -> int:
    """Frames a slice of the no-grad per-token branch: the largest divisor of ``frames`` holding at most FFN_TOKENS
    tokens (at least 1), so that the slices have one shape and a compiled branch one graph."""
    cap = max(1, FFN_TOKENS // pixels)
    return max(d for d in range(1, min(cap, frames) + 1) if frames % d == 0)


class SWSABlock(nn.Module):
    """Pre-norm block: x + attention branch, then x + GEGLU branch. Input/output (B, D, H, W, C)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        shift: Size3,
        use_checkpoint_attn: bool = False,
        use_checkpoint_ffn: bool = False,
    ) -> None:
        super().__init__()
        self.shift = shift
        self.use_checkpoint_attn = use_checkpoint_attn
        self.use_checkpoint_ffn = use_checkpoint_ffn
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = GEGLU(dim, 2 * dim)

    def _geometry(self, size: Sequence[int]) -> Tuple[Size3, Size3, Size3, Tuple[int, int, int, int], Tuple[int, ...]]:
        """(B, D, H, W) -> window, shift, padded (D, H, W), the windows' grid (B, Dw, Hw, Ww) and the shifted axes."""
        b, d, h, w = size
        ws, ss = effective_window((d, h, w), WINDOW, self.shift)
        padded = tuple(-(-n // s) * s for n, s in zip((d, h, w), ws))
        grid = (b, *(n // s for n, s in zip(padded, ws)))
        return ws, ss, padded, grid, tuple(i for i in range(3) if ss[i] > 0)

    def attention_windows(self, x: Tensor) -> Tensor:
        """:meth:`_windows`, as a piece of :meth:`attend_in_parts` compiled on its own (compiling replaces this method
        on the instance; the code traced for the whole residual calls :meth:`_windows`)."""
        return self._windows(x)

    def _windows(self, x: Tensor) -> Tensor:
        """The windows the attention branch attends: norm1, zero padding (after the norm), the cyclic shift and the
        partition, (B, D, H, W, C) -> (B*nW, n, C); in the autocast dtype under autocast, which the qkv projection,
        their only reader, would cast them to anyway."""
        b, d, h, w, _ = x.shape
        ws, ss, padded, _, axes = self._geometry((b, d, h, w))
        u = self.norm1(x)
        if torch.is_autocast_enabled(u.device.type):
            u = u.to(torch.get_autocast_dtype(u.device.type))
        u = F.pad(u, (0, 0, 0, padded[2] - w, 0, padded[1] - h, 0, padded[0] - d))
        if axes:
            u = torch.roll(u, shifts=tuple(-s for s in ss), dims=(1, 2, 3))
        return window_partition(u, ws)

    def _merged(self, o: Tensor, size: Sequence[int]) -> Tensor:
        """Attended windows (B*nW, n, C) -> the attention branch (B, D, H, W, C): merged, shifted back, cropped."""
        b, d, h, w = size
        ws, ss, padded, _, axes = self._geometry(size)
        u = window_merge(o, ws, b, *padded)
        if axes:
            u = torch.roll(u, shifts=ss, dims=(1, 2, 3))
        return u[:, :d, :h, :w]

    def attention_merge(self, x: Tensor, o: Tensor, into: Optional[Tensor] = None) -> None:
        """Adds the attention branch, from its attended windows ``o`` (B*nW, n, C), to x: in place, or into ``into``
        (x's shape, another layout). Compiled, the sum is one pass that writes ``into`` and reads x in its own layout,
        where an eager copy of x into that layout reads one of the two across its layout."""
        merged = self._merged(o, x.shape[:4])
        if into is None:
            x += merged
        else:
            torch.add(x, merged, out=into)

    def _attn_branch(self, x: Tensor, labels: Optional[Tensor]) -> Tensor:
        _, _, _, grid, axes = self._geometry(x.shape[:4])
        o = self.attn(self._windows(x), labels if axes else None, grid, axes)
        return self._merged(o, x.shape[:4])

    def sdpa_parts(self, x: Tensor) -> List[Tuple[int, int, int]]:
        """The parts (batch index, first and end window plane along the frames) in which SDPA attends x's windows
        when it applies (:func:`use_sdpa`) and they do not fit one part of ``attn.sdpa_part_windows``; else []. Parts
        are whole planes (one window along the frames, all along H and W), as many planes each as divides the planes
        evenly (one compiled shape), and each batch item is cut on its own."""
        if not use_sdpa(x):
            return []
        _, _, _, (b, dw, hw, ww), _ = self._geometry(x.shape[:4])
        cap = max(1, self.attn.sdpa_part_windows // (hw * ww))
        if b * dw <= cap:
            return []
        step = max(k for k in range(1, min(cap, dw) + 1) if dw % k == 0)
        return [(i, d0, d0 + step) for i in range(b) for d0 in range(0, dw, step)]

    def attend_in_parts(
        self, x: Tensor, labels: Optional[Tensor], parts: List[Tuple[int, int, int]], own: bool = False
    ) -> Tensor:
        """:meth:`attend` over a large volume, without autograd: :meth:`attention_windows` over the volume, then
        :meth:`WindowAttention.attend_part` part by part (:meth:`sdpa_parts`) over the windows in place, then
        :meth:`attention_merge`: three functions that compile on their own (a part's graph does not grow with the
        frame, where one graph of the whole residual held every part: 25-28 s to compile at 20 frames of 1080p,
        H200). A part that does not end the volume has no last window along the frames: that axis counts as
        unshifted there. The part that ends a volume shifted along the frames runs eagerly (:meth:`_sdpa`): it comes
        once a call, and its graph, the largest of the three kinds (seven masked window sets), took 7.0 s of an empty
        cache's compilation at 20 frames of 1080p (H200; the other kinds 1.3 and 3.7 s). ``own``: see
        :meth:`_merge_into`."""
        _, _, _, (_, dw, hw, ww), axes = self._geometry(x.shape[:4])
        plane = hw * ww
        u = self.attention_windows(x)
        for i, d0, d1 in parts:  # each part's output replaces its windows: one volume of windows, not two
            rows = slice((i * dw + d0) * plane, (i * dw + d1) * plane)
            lab = labels[d0 * plane : d1 * plane] if axes else None
            part_axes = tuple(a for a in axes if a != 0 or d1 == dw)
            attend = self.attn._sdpa if 0 in part_axes else self.attn.attend_part
            u[rows] = attend(u[rows], lab, (1, d1 - d0, hw, ww), part_axes)
        return self._merge_into(x, u, own)

    def window_chunks(self, x: Tensor) -> List[Tuple[int, int]]:
        """The steps (first and end window) in which the explicit path attends x's windows without autograd, where
        SDPA does not apply and they are more than one step (``attn.max_windows``); else []. Steps are equal where a
        divisor of the window count lies in (max_windows / 2, max_windows] (one compiled shape), else full steps and a
        shorter last one."""
        if use_sdpa(x):
            return []
        _, _, _, grid, _ = self._geometry(x.shape[:4])
        windows, cap = math.prod(grid), self.attn.max_windows
        if windows <= cap:
            return []
        step = next((k for k in range(cap, cap // 2, -1) if windows % k == 0), cap)
        return [(s, min(s + step, windows)) for s in range(0, windows, step)]

    def attend_in_chunks(
        self, x: Tensor, labels: Optional[Tensor], chunks: List[Tuple[int, int]], own: bool = False
    ) -> Tensor:
        """:meth:`attend` through the explicit path, without autograd, one step of windows after the other from eager
        code (:meth:`window_chunks`): :meth:`attention_windows`, :meth:`WindowAttention.attend_chunk` per step over
        the windows in place, :meth:`attention_merge`, each compiled on its own. Traced as one graph, the steps bounded
        nothing: Inductor computed every step's scores before the first softmax (it fuses the steps' softmaxes, which
        read the same bias), all (windows, heads, n, n) of them alive at once. ``own``: see :meth:`_merge_into`."""
        _, _, _, grid, axes = self._geometry(x.shape[:4])
        u = self.attention_windows(x)
        lab = labels.repeat(grid[0], 1) if axes else None  # window i of the batch uses labels[i % nW]
        for s, e in chunks:  # in place, as in attend_in_parts
            u[s:e] = self.attn.attend_chunk(u[s:e], None if lab is None else lab[s:e])
        return self._merge_into(x, u, own)

    def _merge_into(self, x: Tensor, o: Tensor, own: bool) -> Tensor:
        """x + the attention branch (:meth:`attention_merge`), written over x where the caller gives it up (``own``)
        and it is contiguous; else into a new contiguous volume. In place, the merge holds x and the windows, not a
        third volume for its result: with the parts and steps written over the windows too, a block over a large
        volume holds two volumes (x and its windows) where it held four."""
        if own and x.is_contiguous():
            self.attention_merge(x, o)
            return x
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        self.attention_merge(x, o, out)
        return out

    def _ffn_branch(self, x: Tensor) -> Tensor:
        return ffn_branch(self.norm2, self.mlp, x)

    def attend(self, x: Tensor, labels: Optional[Tensor]) -> Tensor:
        """x + the attention branch, without autograd, where its windows are one SDPA part or one step of the explicit
        path: what :func:`compile_swsa_blocks` compiles per block (larger volumes: :meth:`attend_in_parts`,
        :meth:`attend_in_chunks`)."""
        return x + self._attn_branch(x, labels)

    # the no-grad per-token residual; compile_swsa_blocks puts one compiled copy here
    ffn = staticmethod(ffn_residual)

    def forward(self, x: Tensor, labels: Optional[Tensor], own: bool = False) -> Tensor:
        """x: (B, D, H, W, C); labels: (nW, n) shift-region ids of the padded volume (used by shifted blocks). own:
        without autograd, the caller gives x up: over large volumes the block may return it, written over."""
        if torch.is_grad_enabled():
            ckpt = self.training
            if ckpt and self.use_checkpoint_attn:
                x = x + checkpoint(self._attn_branch, x, labels, use_reentrant=False)
            else:
                x = x + self._attn_branch(x, labels)
            if ckpt and self.use_checkpoint_ffn:
                return x + checkpoint(self._ffn_branch, x, use_reentrant=False)
            return x + self._ffn_branch(x)
        parts, chunks = self.sdpa_parts(x), self.window_chunks(x)
        if parts:
            x = self.attend_in_parts(x, labels, parts, own)
        elif chunks:
            x = self.attend_in_chunks(x, labels, chunks, own)
        else:
            x = self.attend(x, labels)
        # per-token branch, in place, a few frames at a time: its 2C-wide hidden never spans the clip
        step = ffn_frames(x.shape[1], x.shape[2] * x.shape[3])
        for s in range(0, x.shape[1], step):
            self.ffn(self.norm2, self.mlp, x[:, s : s + step])
        return x


# compile_blocks compiles each SWSA block's attention residual (one graph per shift and size); False leaves it eager:
# SDPA, two GEMMs and a few copies, for the compile and load time of the two largest graphs (an experiment:
# benchmarks/NOTES.md; bench_gsm's ``--variants swsac=0``, bench_infer's ``--set``)
COMPILE_ATTENTION = True


def attention_pieces(blk: SWSABlock) -> List[Tuple[nn.Module, str]]:
    """(owner, method name) of what is compiled of a block's attention residual: the whole (:meth:`SWSABlock.attend`)
    and the pieces that :meth:`SWSABlock.attend_in_parts` (SDPA) and :meth:`SWSABlock.attend_in_chunks` (explicit
    path) run over volumes larger than one part or step."""
    return [
        (blk, 'attend'), (blk, 'attention_windows'), (blk, 'attention_merge'), (blk.attn, 'attend_part'),
        (blk.attn, 'attend_chunk'),
    ]  # fmt: skip


def compile_swsa_blocks(blocks: Sequence[SWSABlock], **kwargs: Any) -> None:
    """``torch.compile(**kwargs)`` what the blocks' no-grad forward runs, in place: each block's attention residual
    (:meth:`SWSABlock.attend`, or over large volumes its pieces, :func:`attention_pieces`; static shapes: the
    window-chunk loops specialise a dynamic graph on the window count anyway, so automatic dynamic shapes only added
    a compilation at the second size) and one per-token residual shared by all of them (:func:`ffn_residual`;
    automatic dynamic shapes: at most two graphs). The residual runs a few frames at a time; compiling the whole
    forward unrolled that loop into the graph, one copy per slice, so compile time grew with the clip length.
    Compilation happens at a function's first call, so pieces a run does not use cost nothing. Parameters stay where
    they are: state-dict keys do not change. With autograd the blocks run eagerly (``compile_blocks`` is for
    evaluation)."""
    ffn = torch.compile(ffn_residual, **kwargs)
    for blk in blocks:
        if COMPILE_ATTENTION:
            for owner, name in attention_pieces(blk):
                setattr(owner, name, torch.compile(getattr(owner, name), **{'dynamic': False, **kwargs}))
        blk.ffn = ffn


class SWSAGroup(nn.Module):
    """``depth`` SWSA blocks alternating unshifted / shifted windows. (B, C, T, H, W) -> same; no outer residual."""

    def __init__(
        self, dim: int, depth: int, num_heads: int, use_checkpoint_attn: bool = False, use_checkpoint_ffn: bool = False
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                SWSABlock(dim, num_heads, (0, 0, 0) if j % 2 == 0 else SHIFT, use_checkpoint_attn, use_checkpoint_ffn)
                for j in range(depth)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.consume([x])

    def consume(self, held: List[Tensor], own: bool = False) -> Tensor:
        """``forward(held.pop())``, holding that input no longer than the first block needs it: where the caller
        keeps no other reference (the streaming sweep's slab copies, 0.69 GiB for 16 frames of 180 x 320 in fp32),
        it is freed before the second block runs. Each block after the first gets its input to write over
        (``SWSABlock.forward``'s ``own``); the first where ``own`` says that the caller gives the input up."""
        x = held.pop()
        _, _, d, h, w = x.shape
        ws, ss = effective_window((d, h, w), WINDOW, SHIFT)
        padded = tuple(-(-n // s) * s for n, s in zip((d, h, w), ws))
        labels = shift_labels(padded, ws, ss, x.device)
        t = x.permute(0, 2, 3, 4, 1)
        del x
        for i, blk in enumerate(self.blocks):
            t = blk(t, labels, own or i > 0)
        return t.permute(0, 4, 1, 2, 3)
