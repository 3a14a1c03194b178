"""GSMNet: Gather-Scatter Mamba video super-resolution (arXiv 2510.00862), faithful to the official GSMamba.

Forward (ARCHITECTURE.md §1): SpyNet flows between adjacent frames -> ``conv_first`` -> P propagation layers
(SWSA over all frames, then a sequential sweep of the GSM block over sliding K-frame windows) ->
LayerNorm + Linear with the long residual -> pixel-shuffle reconstruction + bilinear global skip.
Module and parameter names reproduce the official state dict, so official checkpoints load strictly.
"""

from __future__ import annotations

import functools
import importlib
from contextlib import nullcontext
from typing import Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from basicsr.archs.spynet_arch import SpyNet
from basicsr.utils.registry import ARCH_REGISTRY
from torch import Tensor, nn
from torch.nn import functional as F

from gsmsr.archs import swsa
from gsmsr.archs.flow import adjacent_flows, gather_scatter_flows, load_spynet_weights, warp, window_link_flows
from gsmsr.archs.gsm_block import GSMBlock
from gsmsr.archs.implicit_warp import ImplicitWarp
from gsmsr.archs.swsa import SWSABlock, SWSAGroup, compile_swsa_blocks, ffn_residual
from gsmsr.compile_cache import INDUCTOR_OPTIONS
from gsmsr.ops.layout_copy import contiguous_frames, copy_frames
from gsmsr.ops.matmul3x import TF32x3Mode

MIN_SIZE = 33  # SpyNet's coarsest level vanishes below this (§1)
RECON_FEAT = 64

WindowFlows = List[Tuple[List[Optional[Tensor]], List[Optional[Tensor]]]]


class Stage(nn.Module):
    """SWSA group, then the in-place sliding-window GSM sweep, with a residual around both (§4.2, §4.4)."""

    def __init__(
        self,
        dim: int,
        attn_depth: int,
        num_heads: int,
        use_checkpoint_attn: bool,
        use_checkpoint_ffn: bool,
        mamba_directions: int,
        scan_backend: str,
        checkpoint_mlp: bool = False,
    ) -> None:
        super().__init__()
        self.attn_blocks = SWSAGroup(dim, attn_depth, num_heads, use_checkpoint_attn, use_checkpoint_ffn)
        self.mamba_block = GSMBlock(dim, use_checkpoint_attn, mamba_directions, scan_backend, checkpoint_mlp)


class PropLayer(nn.Module):
    def __init__(self, stage: Stage) -> None:
        super().__init__()
        self.stage = stage


class Transpose12(nn.Module):
    """(B, C, T, H, W) <-> (B, T, C, H, W), so PixelShuffle acts per frame."""

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2)


class FramePixelShuffle(nn.PixelShuffle):
    """``nn.PixelShuffle`` over frames (B, T, C, H, W) that keeps a channels-last input channels-last: the
    reconstruction's convs then take and give ``torch.channels_last_3d`` volumes, where cuDNN transposed every
    channel-first input to NHWC and its output back (14 transposes a frame in the profile of the default). Same
    values: a pure rearrangement, ``out[..., c, h r + i, w r + j] = x[..., c r^2 + i r + j, h, w]``."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5:
            return super().forward(x)
        r = self.upscale_factor
        rows = x.permute(0, 1, 3, 4, 2)  # (B, T, H, W, C)
        if not rows.is_contiguous():
            return super().forward(x)
        b, t, h, w, c = rows.shape
        y = rows.view(b, t, h, w, c // (r * r), r, r).permute(0, 1, 2, 5, 3, 6, 4)  # (B, T, H, i, W, j, c)
        return y.reshape(b, t, h * r, w * r, c // (r * r)).permute(0, 1, 4, 2, 3)


def make_upsampler(scale: int, feat: int = RECON_FEAT) -> nn.Sequential:
    """Conv3d + pixel shuffle stages; entry indices (0, 5, 10 for x4) match the official keys."""

    def stage(factor: int) -> List[nn.Module]:
        return [
            nn.Conv3d(feat, factor * factor * feat, (1, 3, 3), padding=(0, 1, 1)),
            Transpose12(),
            FramePixelShuffle(factor),
            Transpose12(),
            nn.LeakyReLU(0.1, inplace=True),
        ]

    layers: List[nn.Module] = []
    if scale & (scale - 1) == 0:
        for _ in range(scale.bit_length() - 1):
            layers += stage(2)
    elif scale == 3:
        layers += stage(3)
    else:
        raise ValueError(f'upscale must be a power of 2 or 3, got {scale}')
    layers.append(nn.Conv3d(feat, feat, (1, 3, 3), padding=(0, 1, 1)))
    return nn.Sequential(*layers)


def traced_switches() -> Tuple[object, ...]:
    """Module-level settings that the compiled blocks read while they are traced. ``torch.compile`` guards on them;
    a precompiled function's saved guards leave globals out, so they are part of its key instead."""
    from gsmsr.archs import bimamba, gsm_block, implicit_warp
    from gsmsr.ops import cuda_kernel, matmul3x
    from gsmsr.ops.triton_jit import triton_available

    scan = importlib.import_module('gsmsr.ops.selective_scan')  # the module; gsmsr.ops exports a function of that name
    return (
        ('sdpa_attention', swsa.SDPA_ATTENTION),
        ('max_windows', swsa.WindowAttention.max_windows),
        ('scan_infer', scan.INFER_IMPL),
        ('mamba_kernel', cuda_kernel()),
        ('triton', triton_available()),
        ('bimamba', bimamba.FLIP_FREE),
        ('bimamba_gate_once', bimamba.GATE_OUTSIDE),
        ('implicit_attn', implicit_warp.FUSED_ATTENTION),
        ('slot_warp', gsm_block.FUSED_SCATTER),
        ('split_in_registers', matmul3x.SPLIT_IN_REGISTERS),
    )


@ARCH_REGISTRY.register()
class GSMNet(nn.Module):
    """Gather-Scatter Mamba network.

    Args (official names; defaults are the released REDS x4 model):
        upscale: scale factor s (power of 2, or 3).
        in_chans, out_chans: image channels (3).
        prop_depth: P propagation layers. The official network reverses time at the output of every layer,
            so an odd P would return a time-reversed clip; here the final order is always restored.
        attn_depth: SWSA blocks per layer.
        pa_frame: window radius r (K = 2r + 1 frames).
        embed_dims: feature width C (divisible by num_heads and by 4).
        num_heads: attention heads (SWSA and implicit warp).
        spynet_path: BasicSR SpyNet checkpoint to initialise the flow network (None: random init).
        use_checkpoint_attn, use_checkpoint_ffn: gradient checkpointing in training (memory only).
        drop_path_rate, norm_layer, is_train: accepted for official option files, unused (as officially).
    Research switches (defaults reproduce the official network, see README):
        anchor: 'center' | 'last' - the slot every window is aligned to.
        scatter: write back all valid slots of a window (True) or only the anchor (False).
        align: 'implicit' (learned implicit warp) | 'bilinear' (plain flow warp) for the gather.
        flow_compose: 'official' | 'geometric' order of multi-hop flow composition.
        alternate_direction: alternate forward/backward sweeps between layers (True) or all forward.
        mamba_directions: 2 (bidirectional, official) or 1 (forward scan only).
        scan_backend: 'auto' | 'kernel' | 'triton' (gsmsr's Triton scan, with autograd too) | 'ref' selective-scan
            implementation (gsmsr.ops; 'auto': kernel_status() says what runs).
    Speed/memory switches (same values up to rounding):
        streaming_eval: without autograd, run each layer as a stream over time that holds one copy of the
            features plus a few frames, instead of several whole-clip copies, so memory hardly grows with T
            (see :meth:`stream_layer`).
        use_checkpoint_mlp: in training, also checkpoint the GSM block's MLP (LN, fc1, depthwise conv, GELU, fc2),
            which the official network does not: its 4C-wide hidden activations are the largest a window step
            keeps for the backward (memory only; one more fc1 + conv per window in the backward).
        compile_blocks: on CUDA, ``torch.compile`` the GSM window step and the SWSA blocks (in place, so the
            state-dict keys do not change) at the first forward; the selective scan stays one custom op inside
            the compiled graph. Costs a compilation per new input size.
        fp32_matmul: '3xtf32' (default) | 'ieee': with ``compile_blocks``, in fp32 on CUDA (no autocast, no
            autograd), the compiled blocks run their GEMMs with K >= 64 as three TF32 tensor-core products each
            (:mod:`gsmsr.ops.matmul3x`; about 1e-6 relative per GEMM, like fp32; on an H200 the whole fp32 network
            1.2x faster than with 'ieee' at fp32's max abs error against the faithful path, benchmarks/NOTES.md);
            'ieee' keeps cuBLAS's fp32 FMA GEMMs. No effect otherwise.
    Attribute, not an argument: ``precompile_dir`` (default None), with ``compile_blocks``, keeps the window step and
    the SWSA block as ahead-of-time compiled functions in that folder (:class:`gsmsr.compile_cache.PrecompiledFunction`,
    one per block kind, shared by all layers), so that a later process loads them instead of tracing them again.
    ``gsmsr infer`` sets it (a folder of its compile cache) unless ``GSMSR_AOT=0``.

    Shapes: forward(lq (B, T, in_chans, H, W)) -> (B, T, out_chans, s*H, s*W), not clamped.
    Requires T >= 2 and H, W >= 33.
    """

    def __init__(
        self,
        upscale: int = 4,
        in_chans: int = 3,
        out_chans: int = 3,
        prop_depth: int = 4,
        attn_depth: int = 4,
        pa_frame: int = 2,
        embed_dims: int = 192,
        num_heads: int = 8,
        spynet_path: Optional[str] = None,
        use_checkpoint_attn: bool = False,
        use_checkpoint_ffn: bool = False,
        drop_path_rate: float = 0.2,
        norm_layer=None,
        is_train: bool = True,
        anchor: str = 'center',
        scatter: bool = True,
        align: str = 'implicit',
        flow_compose: str = 'official',
        alternate_direction: bool = True,
        mamba_directions: int = 2,
        scan_backend: str = 'auto',
        streaming_eval: bool = True,
        use_checkpoint_mlp: bool = False,
        compile_blocks: bool = False,
        fp32_matmul: str = '3xtf32',
    ) -> None:
        super().__init__()
        if embed_dims % num_heads or embed_dims % 4:
            raise ValueError(f'embed_dims ({embed_dims}) must be divisible by num_heads ({num_heads}) and by 4')
        choices = {
            'anchor': (anchor, ('center', 'last')),
            'align': (align, ('implicit', 'bilinear')),
            'flow_compose': (flow_compose, ('official', 'geometric')),
            'mamba_directions': (mamba_directions, (1, 2)),
            'scan_backend': (scan_backend, ('auto', 'kernel', 'triton', 'ref')),
            'fp32_matmul': (fp32_matmul, ('ieee', '3xtf32')),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f'{name} must be one of {allowed}, got {value!r}')
        if prop_depth < 1 or attn_depth < 0 or pa_frame < 1:
            raise ValueError(
                f'need prop_depth >= 1, attn_depth >= 0, pa_frame >= 1; got {prop_depth}, {attn_depth}, {pa_frame}'
            )
        self.upscale = upscale
        self.in_chans = in_chans
        self.out_chans = out_chans
        self.pa_frame = pa_frame
        self.anchor = anchor
        self.scatter = scatter
        self.align = align
        self.flow_compose = flow_compose
        self.alternate_direction = alternate_direction
        self.streaming_eval = streaming_eval
        self.compile_blocks = compile_blocks
        self.fp32_matmul = fp32_matmul
        self.precompile_dir: Optional[str] = None
        self._compiled = False
        # Optional hook (flows_backward, flows_forward) -> (flows_backward, flows_forward), e.g. flow stress tests.
        self.flow_transform: Optional[Callable[[Tensor, Tensor], Tuple[Tensor, Tensor]]] = None

        self.conv_first = nn.Conv3d(in_chans, embed_dims, (1, 3, 3), padding=(0, 1, 1))
        self.prop_layers = nn.ModuleList(
            [
                PropLayer(
                    Stage(
                        embed_dims,
                        attn_depth,
                        num_heads,
                        use_checkpoint_attn,
                        use_checkpoint_ffn,
                        mamba_directions,
                        scan_backend,
                        use_checkpoint_mlp,
                    )
                )
                for _ in range(prop_depth)
            ]
        )
        self.implicit_align = ImplicitWarp(embed_dims, num_heads)
        self.norm = nn.LayerNorm(embed_dims)
        self.conv_after_body = nn.Linear(embed_dims, embed_dims)
        self.conv_before_upsample = nn.Sequential(
            nn.Conv3d(embed_dims, RECON_FEAT, (1, 3, 3), padding=(0, 1, 1)), nn.LeakyReLU(0.01, inplace=True)
        )
        self.upsample = make_upsampler(upscale)
        self.conv_last = nn.Conv3d(RECON_FEAT, out_chans, (1, 3, 3), padding=(0, 1, 1))
        self.spynet = SpyNet()
        if spynet_path:
            load_spynet_weights(self.spynet, spynet_path)

    # -- input checks ---------------------------------------------------------------------------------
    def check_input(self, lq: Tensor) -> None:
        if lq.dim() != 5:
            raise ValueError(f'GSMNet expects (B, T, C, H, W) input, got shape {tuple(lq.shape)}')
        b, t, c, h, w = lq.shape
        if not lq.is_floating_point():
            raise TypeError(f'GSMNet expects a floating-point input in [0, 1], got dtype {lq.dtype}')
        if c != self.in_chans:
            raise ValueError(f'GSMNet expects {self.in_chans} channels, got shape {tuple(lq.shape)}')
        if t < 2:
            raise ValueError(f'GSMNet needs at least 2 frames, got T={t} (shape {tuple(lq.shape)})')
        if h < MIN_SIZE or w < MIN_SIZE:
            raise ValueError(
                f'GSMNet needs H, W >= {MIN_SIZE} (SpyNet pyramid), got {h}x{w} '
                f'(shape {tuple(lq.shape)}); pad or tile the input'
            )

    # -- flows ------------------------------------------------------------------------------------------
    def get_flows(self, lq: Tensor) -> Tuple[Tensor, Tensor]:
        """(flows_backward, flows_forward), each (B, T-1, 2, H, W)."""
        fb, ff = adjacent_flows(self.spynet, lq)
        if self.flow_transform is not None:
            fb, ff = self.flow_transform(fb, ff)
        return fb, ff

    def anchor_slot(self) -> int:
        return self.pa_frame if self.anchor == 'center' else 2 * self.pa_frame

    def window_flows(self, fb: Tensor, ff: Tensor) -> WindowFlows:
        """Gather and scatter flows of every window, in the given time order (computed once per forward)."""
        k = 2 * self.pa_frame + 1
        a = self.anchor_slot()
        out = []
        for t in range(fb.shape[1] + 1):
            lb, lf = window_link_flows(fb, ff, t - a, k)
            # canonical strides: one-hop flows are views into the clip's flows, whose batch stride (a size-1 dim,
            # which contiguous() leaves alone) depends on the clip length; compiled window steps guard on strides,
            # so they would compile a graph per clip length and per clip end. A view again when already dense.
            out.append(
                tuple(
                    [None if f is None else f.reshape(-1).view(f.shape) for f in flows]
                    for flows in gather_scatter_flows(lb, lf, a, self.flow_compose)
                )
            )
        return out

    # -- propagation ------------------------------------------------------------------------------------
    def window_frames(self, t: int, t_len: int) -> Tuple[List[int], List[Tuple[int, int]]]:
        """Window t: the frame read by each slot (clamped at the clip ends), and the (slot, frame) pairs written."""
        k = 2 * self.pa_frame + 1
        a = self.anchor_slot()
        reads = [min(max(t - a + i, 0), t_len - 1) for i in range(k)]
        writes = [(i, t - a + i) for i in range(k) if 0 <= t - a + i < t_len and (self.scatter or i == a)]
        return reads, writes

    def sweep(self, block: GSMBlock, y: Tensor, flows: WindowFlows) -> Tensor:
        """Sequential sliding-window GSM sweep; each window reads the frames its predecessors wrote (§4.4)."""
        t_len = y.shape[2]
        frames = list(y.unbind(2))
        for t in range(t_len):
            reads, writes = self.window_frames(t, t_len)
            out = block(torch.stack([frames[i] for i in reads], dim=2), *flows[t], self._aligner())
            for i, s in writes:
                frames[s] = out[:, :, i]
        return torch.stack(frames, dim=2)

    # frames per SWSA slab of the streaming schedule; larger slabs recompute fewer halo frames, smaller ones
    # hold fewer frames (each slab frame costs about four feature copies while its SWSA group runs). Clips of up to
    # stream_whole frames run each SWSA group once over the whole clip, with no halo recomputed: at 20 x 180 x 320,
    # bf16, compiled, 55.8 against 62.9 ms a frame in 5.05 against 4.23 GiB (H200). Slabs of 12 on long clips
    # would cost as much memory more per slab (100 frames: 8.79 against 6.92 GiB) for 5 % less time.
    stream_slab = 8
    stream_whole = 20
    # the streaming sweep's windows as slots 1..K of a (B, C, K+1, H, W) buffer whose slots 0..K-1 the previous window
    # step wrote (``GSMBlock.forward(out=)``), so that only the new frame is copied in; False stacks each window
    # (five frame copies, the explicit form). Same values either way (:meth:`window_buffer`).
    stream_buffers = True
    # LR pixels per call of the streaming schedule's per-frame convs (shallow features, reconstruction: at least a
    # frame); the reconstruction's steps are forward_frames' pieces
    stream_frame_pixels = 65536

    def stream_layer(self, stage: Stage, x: Tensor, flows: WindowFlows, order: Sequence[int]) -> None:
        """``x <- x + sweep(SWSA(x))`` in place, holding a few frames beyond ``x`` itself (no autograd).

        x: (B, C, T, H, W); ``order[s]`` is where logical frame s of this layer is stored (the official network
        flips time between layers; here the flip is only this relabelling). SWSA runs just ahead of the sweep,
        on time slabs with a halo: each SWSA block moves information by at most one frame, so with a halo of
        ``attn_depth`` frames (rounded up to even, so that windows align as in one pass) slab borders never
        reach the kept frames (a clip end is no border: the first and last slabs keep their end frames, and a
        clip of at most ``stream_whole`` frames is one slab). The only difference is the shifted window that wraps
        around the clip ends, whose masked logits (-100) weigh ``exp(-100)``: the values agree up to rounding. A
        frame is added to ``x`` once the sweep is done with it and no later slab reads its old value.

        Copies outside the compiled blocks are kept few (benchmarks/NOTES.md, "Inference, part 7"): a whole clip in
        its stored order goes into SWSA as ``x`` itself, whose frames are then kept as views of the SWSA output; with
        ``stream_buffers`` each window step writes its result into a buffer that the next window reads at an offset
        of one slot (:meth:`window_buffer`).
        """
        t_len = len(order)
        k = 2 * self.pa_frame + 1
        a = self.anchor_slot()
        depth = len(stage.attn_blocks.blocks)
        halo = depth + depth % 2
        state: Dict[int, Tensor] = {}  # SWSA output, then sweep state, of the frames in flight
        done: Dict[int, Tensor] = {}  # finished frames waiting to be added to x
        ready = 0  # SWSA output exists for logical frames < ready

        def swsa_until(stop: int) -> None:
            nonlocal ready
            while ready < stop:
                p = ready
                # every slab spans the same number of frames where the clip allows (one compiled shape): at the
                # clip ends it reaches further in, which only adds context; lo stays even, as in one pass
                size = t_len if t_len <= self.stream_whole else self.stream_slab + 2 * halo
                lo = max(0, min(p - halo, t_len - size))
                lo -= lo % 2
                hi = min(t_len, max(lo + size, p + self.stream_slab + halo))
                if hi == t_len - 1:  # an odd clip: the last slab spans one frame more
                    hi = t_len
                # a slab's frames are exact up to a halo from each cut; a clip end is no cut, so the first slab
                # keeps slab + halo frames and a clip no longer than one slab is done in one go
                q = t_len if hi == t_len else hi - halo
                # the slab goes to the SWSA group (consume): a copy is the group's to write over (own); a whole
                # clip in stored order is x itself, read only
                held = [self.slab_of(x, [order[s] for s in range(lo, hi)], depth > 0, t_len > self.stream_whole)]
                own = held[0].untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
                out = stage.attn_blocks.consume(held, own)
                for s in range(p, q):
                    # a whole clip keeps every frame: views (its window copies them); else a copy, so the halo is
                    # freed now
                    state[s] = out[:, :, s - lo] if lo == p and hi == q else contiguous_frames(out[:, :, s - lo])
                ready = q

        buffer: Optional[Tensor] = None  # (B, C, K+1, H, W) whose slots 0..K-1 the last window step wrote
        for t in range(t_len):
            swsa_until(min(t_len, t - a + k))
            reads, writes = self.window_frames(t, t_len)
            frames = [state[i] for i in reads]
            # every window in the step's result dtype: under autocast a layer's first window holds only SWSA's
            # lower-precision frames, and a window of its own dtype would be a compiled graph of its own
            dtype = stage.mamba_block.result_dtype(functools.reduce(torch.promote_types, [f.dtype for f in frames]))
            if self.stream_buffers:
                buffer = self.window_buffer(buffer, frames, dtype)
                result = buffer.new_empty(buffer.shape)
                out = stage.mamba_block(buffer[:, :, 1:], *flows[t], self._aligner(), out=result[:, :, :k])
                buffer = result
            else:
                out = stage.mamba_block(torch.stack(frames, dim=2).to(dtype), *flows[t], self._aligner())
            for i, s in writes:
                state[s] = out[:, :, i]
            if t >= a:  # frame t - a is read and written by no later window
                done[t - a] = state.pop(t - a)
            read_from = t_len if ready == t_len else ready - halo  # first frame a later slab reads
            for s in [s for s in done if s < read_from]:
                x[:, :, order[s]].add_(done.pop(s))  # add_, not +=: no setitem copy of the frame onto itself
        for s, v in {**done, **state}.items():
            x[:, :, order[s]].add_(v)

    @staticmethod
    def slab_of(x: Tensor, stored: List[int], read_only: bool, channels_last: bool) -> Tensor:
        """``torch.stack([x[:, :, i] for i in stored], 2)``. With ``channels_last`` (the streaming schedule's slabs) a
        copy laid out channels-last (``torch.channels_last_3d``), the layout SWSA's blocks work in, so that the first
        block can write over it; otherwise in x's layout (a whole clip, in either time order: one compiled graph for
        both), ``x``'s own frames where they are that tensor and ``read_only`` (the caller never writes the result).
        Copied in one go where ``stored`` is a run of frames (the streaming schedule's slabs are, in either time
        order)."""
        lo, hi = min(stored), max(stored) + 1
        run = x[:, :, lo:hi]
        natural, flipped = stored == list(range(lo, hi)), stored == list(range(hi - 1, lo - 1, -1))
        if not channels_last:
            if natural:
                return run if read_only and run.is_contiguous() else run.clone(memory_format=torch.contiguous_format)
            if flipped:
                return run.flip(2).contiguous()
            return torch.stack([x[:, :, i] for i in stored], dim=2)  # not a list index: a host-to-device copy
        b, c, _, h, w = x.shape
        cl = torch.channels_last_3d
        slab = torch.empty((b, c, len(stored), h, w), dtype=x.dtype, device=x.device, memory_format=cl)
        if natural:
            return copy_frames(slab, run)
        for j, i in enumerate(stored):
            copy_frames(slab[:, :, j], x[:, :, i])
        return slab

    @staticmethod
    def window_buffer(buffer: Optional[Tensor], frames: List[Tensor], dtype: torch.dtype) -> Tensor:
        """K frames (B, C, H, W) -> a (B, C, K+1, H, W) buffer of ``dtype`` whose slots 1..K hold them, with the
        values of ``torch.stack(frames, 2).to(dtype)``: ``buffer`` when it has that shape and dtype (the last window
        step's output, in slots 0..K-1), where slots already holding their frame are not copied (a sliding window's
        K-1 shared frames), else a new one. The caller guarantees that a slot to be copied into holds nothing still
        in use; in the streaming sweep it holds the last step's result for a frame outside the clip, or for one whose
        state that step did not write (``scatter=False``), or nothing (slot K)."""
        b, c, h, w = frames[0].shape
        shape = (b, c, len(frames) + 1, h, w)
        if buffer is None or buffer.dtype != dtype or buffer.shape != shape:
            buffer = frames[0].new_empty(shape, dtype=dtype)
        for j, f in enumerate(frames):
            slot = buffer[:, :, j + 1]
            if not (f.data_ptr() == slot.data_ptr() and f.dtype == dtype and f.stride() == slot.stride()):
                copy_frames(slot, f)
        return buffer

    def _aligner(self) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """(source, target, flow) -> source aligned to target's grid: the shared implicit warp, or a flow warp."""
        if self.align == 'implicit':
            return self.implicit_align
        return lambda source, target, flow: warp(source, flow)

    def shallow_features(self, lq: Tensor, step: int) -> Tensor:
        """``conv_first`` of lq (B, T, c, H, W) -> (B, C, T, H, W), ``step`` frames a call (a per-frame conv: the same
        values). Over a whole long clip at once, cuDNN's autotuner (``cudnn.benchmark``, as BasicSR's test script sets
        it) tried algorithms with workspaces of several GiB in its first call: the fp32 peak at 100 x 180 x 320
        (H200)."""
        t = lq.shape[1]
        if step >= t:
            return self.conv_first(lq.transpose(1, 2))
        x0 = None
        for s in range(0, t, step):
            y = self.conv_first(lq[:, s : s + step].transpose(1, 2))
            if x0 is None:
                x0 = y.new_empty(y.shape[:2] + (t,) + y.shape[3:])
            x0[:, :, s : s + step] = y
        return x0

    def reconstruct(self, x: Tensor, x0: Tensor, lq: Tensor) -> Tensor:
        """Features (B, C, T, H, W), shallow features x0, input lq (B, T, c, H, W) -> (B, T, out, sH, sW).

        The convs run channels-last (``torch.channels_last_3d``, :class:`FramePixelShuffle`): x is copied so (one
        tiled copy, where LayerNorm copied its permuted input itself), the token-major output of ``conv_after_body``
        then is, and the sums put the channels-last operand first, whose layout an eager sum keeps; the last one puts
        ``skip`` first, so the output is contiguous. (Sums commute exactly.)"""
        b, t, c, h, w = lq.shape
        x = contiguous_frames(x, torch.channels_last_3d)  # LayerNorm's copy of its permuted input, tiled
        x = self.norm(x.permute(0, 2, 3, 4, 1))
        x = self.conv_after_body(x).permute(0, 4, 1, 2, 3) + x0
        x = self.conv_last(self.upsample(self.conv_before_upsample(x)))  # (B, out, T, sH, sW)
        skip = F.interpolate(
            lq.reshape(b * t, c, h, w), size=(h * self.upscale, w * self.upscale), mode='bilinear', align_corners=False
        )
        return skip.view(b, t, c, h * self.upscale, w * self.upscale) + x.transpose(1, 2)

    def _compile(self) -> None:
        """Compile the window step and the SWSA blocks in place (``nn.Module.compile``): keys stay the same."""
        import torch._dynamo

        from gsmsr.ops import cuda_kernel

        cuda_kernel()  # resolve the kernel import eagerly, outside any traced frame
        # one graph per (block kind, shift, input size); the default limit of 8 is reached by T-slab sizes
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        if self.precompile_dir is not None:
            self._precompile(self.precompile_dir)
            return
        for layer in self.prop_layers:
            layer.stage.mamba_block.compile(dynamic=False, options=INDUCTOR_OPTIONS)
        compile_swsa_blocks(self.swsa_blocks(), options=INDUCTOR_OPTIONS)
        self._compiled = True

    def compile_kernels_ahead(self, shape: Sequence[int]) -> bool:
        """Start compiling, in threads, the Triton kernels that window steps on clips of ``shape`` (B, T, C, H, W)
        launch under the caller's autocast, without running them. On an empty kernel cache the first window step
        would compile each kernel at its first launch, one after another (about 40 s on an H200's host for the
        release network); started here, they compile side by side while the first chunk's SWSA runs or compiles.
        What runs is :meth:`window_step_once`, its kernel launches only compiling
        (:func:`gsmsr.ops.triton_jit.compile_ahead`: its outputs are garbage). Returns whether the compilations were
        started (CUDA, Triton with asynchronous compilation)."""
        from gsmsr.ops.triton_jit import compile_ahead, triton_available

        if self.conv_first.weight.device.type != 'cuda' or not triton_available():
            return False
        with compile_ahead() as started:
            if not started:
                return False
            try:
                self.window_step_once(shape)
            except torch.cuda.OutOfMemoryError:  # the eager step can need more than the planned compiled one
                return False  # its kernels then compile at their first launch
            finally:  # its blocks were laid out for one eager step, not for what the run allocates next
                torch.cuda.empty_cache()
        return True

    def window_step_once(self, shape: Sequence[int]) -> Tensor:
        """One eager window step of the first layer, without autograd, on K zero frames of clips of ``shape``
        (B, T, C, H, W), laid out as the streaming sweep lays it out (a window is slots 1..K of a buffer, written
        into slots 0..K-1 of another). Returns the (B, C, K, H, W) result."""
        b, _, c, h, w = shape
        k, a = 2 * self.pa_frame + 1, self.anchor_slot()
        with torch.no_grad():
            lq = torch.zeros(b, k, c, h, w, device=self.conv_first.weight.device)
            flows = self.window_flows(*self.get_flows(lq))
            block = self.prop_layers[0].stage.mamba_block
            x0 = self.conv_first(lq.transpose(1, 2))
            buffer = x0.new_zeros(b, x0.shape[1], k + 1, h, w, dtype=block.result_dtype(x0.dtype))
            out = torch.empty_like(buffer)[:, :, :k]
            return GSMBlock.forward(block, buffer[:, :, 1:], *flows[a], self._aligner(), out=out)

    def swsa_blocks(self) -> List[SWSABlock]:
        """Every SWSA block of the propagation layers, in order."""
        return [blk for layer in self.prop_layers for blk in layer.stage.attn_blocks.blocks]

    def _precompile(self, folder: str) -> None:
        """Route every window step, SWSA attention residual and SWSA per-token residual through one
        :class:`PrecompiledFunction` per kind (the modules are arguments, so the layers share the compiled functions);
        keys stay the same."""
        from gsmsr.compile_cache import PrecompiledFunction

        step = PrecompiledFunction(GSMBlock.forward, folder, traced_switches)
        ffn = PrecompiledFunction(ffn_residual, folder, traced_switches)
        attn: Dict[Tuple[type, str], PrecompiledFunction] = {}  # one per attention piece, shared by the blocks
        for layer in self.prop_layers:
            layer.stage.mamba_block.forward = functools.partial(step, layer.stage.mamba_block)
        for blk in self.swsa_blocks():
            for owner, name in swsa.attention_pieces(blk) if swsa.COMPILE_ATTENTION else ():
                key = (type(owner), name)
                if key not in attn:
                    attn[key] = PrecompiledFunction(getattr(type(owner), name), folder, traced_switches)
                setattr(owner, name, functools.partial(attn[key], owner))
            blk.ffn = ffn
        self.precompiled = (step, *attn.values(), ffn)
        self._compiled = True

    def _gemm_mode(self) -> ContextManager:
        """Around the propagation layers: :class:`~gsmsr.ops.matmul3x.TF32x3Mode` when ``fp32_matmul='3xtf32'`` and
        the blocks are compiled (it acts inside their graphs only, on fp32 CUDA GEMMs without autocast), else
        nothing. Not under CUDA autocast, where it would split nothing and only add a Python call to every eager op."""
        if self.fp32_matmul != '3xtf32' or not self._compiled or torch.is_autocast_enabled('cuda'):
            return nullcontext()
        return TF32x3Mode()

    def forward(self, lq: Tensor) -> Tensor:
        streaming = self._streams()
        pieces = self.forward_frames(lq)
        if not streaming:
            return next(pieces)[1]
        out: Optional[Tensor] = None
        for frames, piece in pieces:
            if out is None:
                out = lq.new_empty(lq.shape[:2] + piece.shape[2:])
            out[:, frames] = piece
        return out

    def _streams(self) -> bool:
        """Whether a forward now runs the streaming schedule (``streaming_eval``, without autograd)."""
        return self.streaming_eval and not torch.is_grad_enabled()

    def forward_frames(self, lq: Tensor) -> Iterator[Tuple[slice, Tensor]]:
        """:meth:`forward` in pieces of consecutive frames, in order: yields ``(frames, out)``, out (B, n, out, sH, sW)
        the output for ``lq[:, frames]``. On the streaming schedule the pieces are the reconstruction's steps (a frame
        at a time from 256x256 up), each yielded once its kernels are queued, so that a caller can take finished
        frames off the device while the later ones are still being reconstructed, and no whole-clip output is
        allocated; otherwise one piece, the whole clip. The input is checked at the call; the work is done as the
        pieces are taken."""
        self.check_input(lq)
        if self.compile_blocks and not self._compiled and lq.is_cuda:
            self._compile()
        return self._pieces(lq, self._streams())

    def _pieces(self, lq: Tensor, streaming: bool) -> Iterator[Tuple[slice, Tensor]]:
        b, t, c, h, w = lq.shape
        fb, ff = self.get_flows(lq)
        step = max(1, self.stream_frame_pixels // (h * w))  # frames a call of the per-frame convs (see below)
        x0 = self.shallow_features(lq, step if streaming else t)  # (B, C, T, H, W)
        natural = self.window_flows(fb, ff)
        flipped: Optional[WindowFlows] = None
        x = x0
        reversed_time = False
        with self._gemm_mode():
            for layer in self.prop_layers:
                if reversed_time:
                    if flipped is None:
                        flipped = self.window_flows(ff.flip(1), fb.flip(1))
                    flows = flipped
                else:
                    flows = natural
                stage = layer.stage
                if streaming:  # x stays in natural order: the flip is a relabelling of the frames
                    self.stream_layer(stage, x, flows, range(t - 1, -1, -1) if reversed_time else range(t))
                else:
                    x = x + self.sweep(stage.mamba_block, stage.attn_blocks(x), flows)
                    if self.alternate_direction:
                        x = x.flip(2)
                if self.alternate_direction:
                    reversed_time = not reversed_time
        if not streaming:
            if reversed_time:
                x = x.flip(2)
            yield slice(0, t), self.reconstruct(x, x0, lq)
            return
        # x0 was updated in place: recompute it per chunk (a cheap conv); reconstruct a few frames at a time,
        # since the x4 upsampler's 64-channel maps are ~20x larger than the features
        for s in range(0, t, step):
            sl = slice(s, min(s + step, t))
            frames = lq[:, sl].transpose(1, 2).contiguous(memory_format=torch.channels_last_3d)
            yield sl, self.reconstruct(x[:, :, sl], self.conv_first(frames), lq[:, sl])
