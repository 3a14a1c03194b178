"""``gsmsr infer``: upscale a video file or a folder of frames with bounded memory.

Python API (used by the CLI):

* :func:`load_network` builds the network (``network_g`` of a BasicSR options file, or the released model)
  and loads a checkpoint strictly.
* :func:`upscale_frames` turns any iterable of RGB uint8 frames into a generator of upscaled frames.
* :func:`upscale_video` streams a file or folder through it into a video file or a PNG folder.

Streaming. Frames are decoded one at a time into a small buffer of LR frames. The video is cut into temporal chunks
of at most ``chunk`` frames overlapping by ``overlap`` with the official chunk rule
(:func:`gsmsr.tiling.window_starts`: the last chunk is moved back to end on the last frame, so every chunk has full
length and context). When the frame count is known beforehand (a folder, or a video whose container declares it) the
chunks are balanced: the fewest chunks of at most ``chunk`` frames, all of one length, even where possible
(:func:`gsmsr.tiling.chunk_length`; 100 frames, chunk 32, overlap 4: 4 chunks of 28, 1.12x the frames in network
work, instead of 4 of 32, 1.28x); otherwise chunks have ``chunk`` frames. Since the start of the next chunk depends
on whether the video ends soon, the reader stays one stride ahead. Each chunk is run in spatial tiles with the
official tile blending (:mod:`gsmsr.tiling`). Overlapping chunks are cross-faded with linear weights ``(k+1)/(n+1)``
over their ``n`` shared frames instead of the official flat average, so chunk borders do not flicker: every frame's
weights sum to one and change smoothly. A frame is quantised and handed to the encoder as soon as no later chunk can
touch it and the network has reconstructed it: GSMNet gives its output a frame at a time
(``GSMNet.forward_frames``), so the encoding of a chunk's first frames overlaps the reconstruction of its last ones,
and the last chunk's frames do not all wait for its end. Memory therefore holds at most ``2*chunk - overlap`` LR
frames and one chunk of HR output (on the compute device), whatever the video length; ``chunk=0`` (one chunk) gives
that up. With one chunk and one tile covering the video the output is exactly the single forward pass.

Defaults: chunk 32, overlap 4, LR tile overlap 32. The tile: on CUDA (:func:`upscale_video`, ``gsmsr infer``)
the tile that computes the fewest pixels within 90 % of the free GPU memory, up to the whole frame
(:mod:`gsmsr.memory_plan`); elsewhere 256 (about one 180x320 REDS frame per tile; smaller frames are one tile).
Where whole frames fit, the chunk too is chosen on CUDA: the fewest balanced chunks of up to 64 frames whose
whole frames fit (and at most 64 frames of 360x640 in LR pixels, which bounds the wait for the first frame), since
each chunk after the first recomputes the shared frames: 100 frames of 360x640 run as 2 chunks of 52 (1.04x
the frames in network work), not 4 of 28 (1.12x). Longer chunks are also closer to the single forward pass.

Fixed shapes, so compiled blocks compile once. All tiles of a frame have one size (the last row and column
are moved inward, overlapping more), every network call of a video gets the same number of tiles (a short
last group is filled up with repeats whose outputs are dropped), and every chunk has the same length. Planned
tile sides are the whole frame side or multiples of 64 (:func:`gsmsr.tiling.plan_tiles`), so videos of
different sizes share tile shapes. The compile caches persist across processes (:mod:`gsmsr.compile_cache`);
the compiled blocks are also kept as precompiled functions, which a later process loads without tracing them
(``GSMNet.precompile_dir``; ``GSMSR_AOT=0`` turns that off).
GSMNet's compiled blocks see K-frame windows and SWSA slabs of 16 frames whatever the chunk length, as long as it
is even and longer than ``GSMNet.stream_whole`` (20): balanced chunks are rounded up to even, and with a maximum
of 32 a video longer than one chunk gets chunks of 20 to 32 frames. Exceptions: a clip shorter than a chunk with an odd
frame count gives the last slab one frame more (slabs start on even frames), i.e. a second SWSA shape; a chunk of
at most 20 frames (a short clip, a balanced chunk of 20, or a maximum below 24 with overlap 4) runs SWSA once over
its whole length, a shape of its own. So do longer chunks of whole frames on CUDA where the memory plan says the
chunk's SWSA transients fit (``stream_whole`` raised to the chunk length for the run: no halo frames recomputed;
``InferenceStats.swsa_whole_chunk``).

I/O beside the GPU. :func:`upscale_video` decodes in a read-ahead thread and quantises each finished frame on
the device, copies it to the host without blocking (pinned memory and an event on CUDA) and encodes it in
writer threads (:mod:`gsmsr.io_threads`); queues are bounded, so host memory stays flat with the video length.
The frames written are byte for byte those of the sequential path (:func:`upscale_frames` into the sink).
Whether the I/O really stays off the GPU's path is measured on every CUDA run: CUDA events around each network
call give the share of the steady state in which the GPU runs the network (:class:`_BusyMeter`, ``gpu_busy_steady``
in the statistics).

Small inputs. GSMNet needs at least 2 frames (clear error otherwise: a single image is not a video) and
sides of at least 33 px (its flow network pads to multiples of 32). A smaller tile or frame is padded by
edge replication to 33 px on the bottom/right before the network and the output is cropped back.

Precision and speed. ``bf16`` / ``fp16`` run the network under ``torch.autocast`` (CUDA or CPU); the network
keeps its flow and warp geometry in fp32 itself. Blending and quantisation are always fp32. On CUDA the CLI
defaults to bf16 and to the compiled window step (``GSMNet.compile_blocks``); ``--precision fp32`` and
``--no-compile`` give the faithful eager path.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import math
import os
import resource
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Deque, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsmsr.compile_cache import AOT_ENV, DoneMarker, MegaCache, enable_persistent_caches
from gsmsr.faults import (
    FaultError,
    InputError,
    check_free_space,
    check_writable,
    input_overlap,
    one_line,
    output_complete,
    run_reporting_errors,
)
from gsmsr.io_threads import FrameWriter, ReadAhead
from gsmsr.launch import launch_timeline
from gsmsr.memory_plan import (
    HEADROOM,
    choose_tiling,
    estimate_peak_bytes,
    free_device_bytes,
    whole_chunk_swsa_fits,
)
from gsmsr.tiling import (
    FrameCall,
    Tile,
    chunk_count,
    chunk_length,
    tile_frames,
    tile_sides,
    tile_weight_map,
    whole_call,
)
from gsmsr.utils import atomic_write_text, resolve_device
from gsmsr.video_io import check_output, estimated_output_bytes, open_sink, open_source, output_kind

IMPORTS_DONE = time.time()  # torch, BasicSR and gsmsr are imported: the launch timeline's imports_done

__all__ = [
    'DEFAULT_NETWORK',
    'MIN_SIZE',
    'InputError',
    'DeviceMemoryError',
    'InferenceStats',
    'load_network',
    'upscale_frames',
    'upscale_video',
    'add_arguments',
    'run',
]

# The released REDS x4 model (ARCHITECTURE.md §0); checkpointing is a training-only memory trade.
DEFAULT_NETWORK = dict(
    type='GSMNet',
    upscale=4,
    in_chans=3,
    out_chans=3,
    prop_depth=4,
    attn_depth=4,
    pa_frame=2,
    embed_dims=192,
    num_heads=8,
    spynet_path=None,
    use_checkpoint_attn=False,
    use_checkpoint_ffn=False,
)
MIN_SIZE = 33  # GSMNet needs H, W > 32 (ARCHITECTURE.md §1)
MIN_FRAMES = 2
DEFAULT_CHUNK, DEFAULT_OVERLAP, DEFAULT_TILE, DEFAULT_TILE_OVERLAP = 32, 4, 256, 32
# --chunk left to choose on CUDA: chunks up to this long where whole frames of them fit in memory, since every chunk
# after the first recomputes `overlap` frames (100 frames of 360 x 640: 2 chunks of 52, 104 frames of work, instead
# of 4 of 28, 112). The first frame waits for the whole first chunk, so a chunk also stays within AUTO_CHUNK_PIXELS
# LR pixel-frames (64 frames of 360 x 640, ~9 s of the network on an H200), and never below DEFAULT_CHUNK.
AUTO_CHUNK_MAX = 64
AUTO_CHUNK_PIXELS = 64 * 360 * 640
PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
READ_AHEAD = 8  # decoded LR frames queued beyond the streamer's own buffer
WRITE_AHEAD_BYTES = 2 * 2**30  # host memory for finished frames waiting for the encoder
# PNG writers (OpenCV releases the GIL); a video has one, in order. A chunk's frames reach them together, and a
# 7680 x 4320 PNG takes over a second to encode: with 4 writers the 20 frames of 1080p x 4 were the run's last 7.5 s
# (16-core H200 machine, 2026-12-04). A few cores stay for the reader, the main thread and the compile workers.
WRITER_THREADS = min(12, max(2, (os.cpu_count() or 1) - 4))
MEMORY_RETRIES = 2  # an automatic tiling that ran out of GPU memory is planned again for half the memory, this often
PLAN_PENDING = 'before the tiling was planned'
# The launch timeline (InferenceStats.timeline): the Unix times (time.time()) at which a run reached each phase, in
# this order. Reading them adds no GPU synchronisation: on CUDA, first_chunk_queued is when the host has queued the
# first chunk's work, which the GPU may still be running; first_frame_written is when its first frame was written.
TIMELINE = (
    'process_start',  # the process started (the OS's record: gsmsr.launch.process_start)
    'gsmsr_import_start',  # `import gsmsr` began: the interpreter is up, nothing heavy imported yet
    'imports_done',  # torch, BasicSR and gsmsr imported (this module loaded)
    'device_chosen',  # the device resolved (on CUDA: the driver initialised, no context yet)
    'input_probed',  # arguments, input, output and free space checked
    'model_built',  # the network constructed on the CPU (randomly initialised)
    'weights_loaded',  # checkpoint read and loaded strictly
    'device_ready',  # network moved to the device (on CUDA: the context created, the weights copied)
    'caches_ready',  # compile caches set up and loaded (compiled CUDA runs; otherwise nothing to do)
    'stream_start',  # tiling planned, output opened, threads started: frames start to flow
    'first_chunk_queued',  # the first chunk's network calls made (compilation, loading precompiled blocks included)
    # the first output frame written (= first_frame_at); frames leave as the network reconstructs them, so this may
    # come before first_chunk_queued (the chunk's last reconstruction steps queued)
    'first_frame_written',
)


class DeviceMemoryError(FaultError):
    """The GPU ran out of memory in :func:`upscale_video`; the message names the planned calls and what to lower.
    Its ``__cause__`` is PyTorch's own error. ``plan``: the planned calls; ``retry``: whether a smaller memory
    budget could help (the tiling was planned from the free memory and no frame was written yet)."""

    def __init__(self, plan: str, cause: str, retry: bool = False) -> None:
        super().__init__(f'out of GPU memory ({plan}); lower --chunk and/or --tile. PyTorch: {cause}')
        self.plan = plan
        self.retry = retry


@dataclass
class InferenceStats:
    output: str
    frames: int
    in_size: tuple  # (H, W)
    out_size: tuple  # (sH, sW)
    seconds: float
    peak_host_bytes: int  # peak resident set size of the process
    peak_device_bytes: Optional[int]  # peak CUDA memory allocated during the run (None on CPU)
    first_frame_seconds: Optional[float] = None  # from the start of the run to the first frame written
    first_frame_at: Optional[float] = None  # Unix time of that write: with the launch time, the start-up it waited for
    tile: Tuple[int, int] = (0, 0)  # LR tile (height, width) used; 0 = the whole side
    tile_batch: int = 1
    chunk: int = 0  # frames per network call (every chunk of the run has this length)
    swsa_whole_chunk: bool = False  # SWSA ran once over each whole chunk rather than in slabs (memory allowing)
    # Share of the steady state (after the first chunk, which compiles) in which the GPU runs the network: the
    # network calls' GPU spans over the time from the first chunk's end to the last chunk's end (_BusyMeter).
    # None on CPU or with a single chunk.
    gpu_busy_steady: Optional[float] = None
    steady_chunks: Optional[int] = None  # the chunks it was measured over (None: not measured)
    # Seconds the network's precompiled functions (unless GSMSR_AOT=0) spent loading files, compiling, and in the first
    # call of each (host time), all of them together, during the run: the part of the first chunk that is start-up
    # rather than frames. None without them.
    precompiled_s: Optional[Dict[str, float]] = None
    # Unix times of the start-up phases, in order (TIMELINE; the CLI's runs have all of them, upscale_video alone
    # the ones from caches_ready on), and where process_start comes from (gsmsr.launch.process_start).
    timeline: Dict[str, float] = dataclasses.field(default_factory=dict)
    process_start_source: Optional[str] = None
    # The process's peak resident set size so far (bytes) when the run reached caches_ready, stream_start,
    # first_chunk_queued and the end of streaming (stream_end): the phase in which the host peak grew.
    host_peak_at: Dict[str, int] = dataclasses.field(default_factory=dict)
    # Seconds of each call of Dynamo's and Inductor's timed compile phases during the run (name -> one entry per
    # call, in order), the phases that took at least COMPILE_PHASE_MIN_S in all: where an empty cache's compilation
    # goes, graph by graph. Empty without compilation.
    compile_phases: Dict[str, List[float]] = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    def summary(self) -> str:
        fps = self.frames / self.seconds if self.seconds > 0 else float('inf')
        mem = f'peak host memory {self.peak_host_bytes / 2**30:.2f} GiB'
        if self.peak_device_bytes is not None:
            mem += f', peak GPU memory {self.peak_device_bytes / 2**30:.2f} GiB'
        if self.gpu_busy_steady is not None:
            mem += f', GPU busy {100 * self.gpu_busy_steady:.0f} % after the first chunk'
        return (
            f'{self.frames} frames {self.in_size[0]}x{self.in_size[1]} -> {self.out_size[0]}x{self.out_size[1]} '
            f'in {self.seconds:.1f} s ({fps:.2f} frames/s), {mem}: {self.output}'
        )


# ----------------------------------------------------------------------------------------------- network
def _read_options(opt: Union[str, dict, None]) -> dict:
    if opt is None or isinstance(opt, dict):
        return dict(opt or {})
    import yaml
    from basicsr.utils.options import ordered_yaml

    try:
        with open(opt, encoding='utf-8') as f:
            loaded = yaml.load(f, Loader=ordered_yaml()[0])
    except OSError as e:
        raise InputError(f'{opt}: cannot read options file ({e.strerror})') from None
    except yaml.YAMLError as e:
        raise InputError(f'{opt}: invalid YAML ({str(e).splitlines()[0]})') from None
    if not isinstance(loaded, dict):
        raise InputError(f'{opt}: options file is not a mapping')
    return loaded


def load_network(
    weights: Optional[str] = None,
    opt: Union[str, dict, None] = None,
    device: Union[str, torch.device] = 'cpu',
    timeline: Optional[Dict[str, float]] = None,
) -> nn.Module:
    """Build the network and load a checkpoint strictly; returns it in eval mode on ``device``.

    opt: a BasicSR options file (or its dict); its ``network_g`` is the config, else the released model.
    weights: a BasicSR (``params_ema`` preferred, then ``params``) or official checkpoint; defaults to the
    options' ``path.pretrain_network_g``. Raises :class:`InputError` naming the file and key on mismatch.
    timeline: gets the Unix times of ``model_built``, ``weights_loaded`` and ``device_ready`` (:data:`TIMELINE`).
    """
    from basicsr.utils.registry import ARCH_REGISTRY

    from gsmsr.archs import load_checkpoint, read_state_dict

    timeline = {} if timeline is None else timeline

    options = _read_options(opt)
    if opt is not None and not options.get('network_g'):
        raise InputError(f'{opt}: options have no network_g section')
    network_opt = dict(options.get('network_g') or DEFAULT_NETWORK)
    weights = weights or (options.get('path') or {}).get('pretrain_network_g')
    if not weights:
        raise InputError('no weights: pass --weights CHECKPOINT (or set path.pretrain_network_g in -opt)')
    if not os.path.isfile(weights):
        raise InputError(f'{weights}: no such checkpoint file')
    arch = network_opt.pop('type', 'GSMNet')
    for key in ('spynet_path', 'use_checkpoint_attn', 'use_checkpoint_ffn'):
        if key in network_opt:  # SpyNet weights come with the checkpoint; no gradients at inference
            network_opt[key] = None if key == 'spynet_path' else False
    try:
        net = ARCH_REGISTRY.get(arch)(**network_opt)
    except KeyError:
        raise InputError(f'network_g type {arch!r} is not a registered architecture') from None
    except TypeError as e:
        raise InputError(f'network_g: {e}') from None
    timeline['model_built'] = time.time()
    try:  # key=None: params_ema, then params, then a bare state dict
        state_dict = read_state_dict(weights, key=None)
    except (OSError, KeyError, ValueError) as e:
        raise InputError(one_line(e, 300)) from None
    try:
        load_checkpoint(net, state_dict, key=None, strict=True)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise InputError(f'{weights}: checkpoint does not fit network_g {arch}: {one_line(e)}') from None
    timeline['weights_loaded'] = time.time()
    net = net.to(device).eval().requires_grad_(False)
    timeline['device_ready'] = time.time()  # no synchronisation added (copies from pageable memory return once staged)
    return net


# ----------------------------------------------------------------------------------------------- streaming
def _network_call(net: Callable[[Tensor], Tensor], scale: int, precision: str, device: torch.device) -> FrameCall:
    """net as a :data:`~gsmsr.tiling.FrameCall` (in pieces where it has ``forward_frames``, as GSMNet, else one),
    with autocast around each piece's work (not around the caller's, between pieces), and with replicate-padding of
    sides < MIN_SIZE (output cropped back); fp32 out."""
    dtype = PRECISIONS[precision]
    frames = getattr(net, 'forward_frames', None) or whole_call(net)

    def call(x: Tensor) -> Iterator[Tuple[slice, Tensor]]:  # (B, T, C, h, w) -> pieces (B, n, C, s*h, s*w) float32
        b, t, c, h, w = x.shape
        if h < MIN_SIZE or w < MIN_SIZE:
            pad = (0, max(0, MIN_SIZE - w), 0, max(0, MIN_SIZE - h))
            x = F.pad(x.reshape(b * t, c, h, w), pad, mode='replicate').view(b, t, c, h + pad[3], w + pad[1])
        autocast = functools.partial(torch.autocast, device.type, dtype=dtype, enabled=dtype is not None)
        with autocast():
            pieces = iter(frames(x))
        while True:
            with autocast():
                piece = next(pieces, None)
            if piece is None:
                return
            yield piece[0], piece[1][..., : scale * h, : scale * w].float()

    return call


def _kernels_done(shape: Tuple[int, int, int, int, int], precision: str, device: torch.device) -> DoneMarker:
    """The marker of a run whose first chunk launched every kernel of calls of ``shape`` at ``precision``: the
    kernel caches hold them from then on."""
    from gsmsr.archs.gsmnet_arch import traced_switches

    key = {'shape': list(shape), 'precision': precision, 'switches': repr(traced_switches())}
    return DoneMarker('kernels', key, device)


def _compile_kernels_ahead(
    net: nn.Module,
    shape: Tuple[int, int, int, int, int],
    precision: str,
    device: torch.device,
    done: Optional[DoneMarker] = None,
) -> bool:
    """Start compiling the network's kernels for calls of ``shape`` (B, T, C, h, w), as :func:`_network_call` makes
    them, where it can (:meth:`GSMNet.compile_kernels_ahead`): before the first chunk, so that on an empty kernel
    cache they compile side by side instead of one at each first launch. Skipped where ``done`` says an earlier
    run compiled them: the eager window step it takes costs ~1.2 s of the first chunk at 360x640 (H200) and
    would only load what the first launches load anyway. Returns whether compilations were started."""
    ahead = getattr(net, 'compile_kernels_ahead', None)
    if ahead is None or device.type != 'cuda' or (done is not None and done.exists()):
        return False
    b, t, c, h, w = shape
    dtype = PRECISIONS[precision]
    with torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
        return bool(ahead((b, t, c, max(h, MIN_SIZE), max(w, MIN_SIZE))))


class _BusyMeter:
    """How busy the GPU is in the steady state, from events on the compute stream around each network call.

    ``mark()`` records an event on the compute stream and returns it (:meth:`for_device`: a timing
    ``torch.cuda.Event``). Steady state: everything after the first chunk, which includes compilation. Busy: the sum
    of the steady calls' spans (start to end event); a span counts as busy in full, the GPU idling inside a call
    included (profiles put the compiled network at ~94 % busy within a call). Window: from the end of the first
    chunk's last call to the end of the last call, so the gaps between calls (waiting for decoded frames, uploads,
    blending, host copies of finished frames; the one-off save of the compile cache after the first chunk where it
    outlasts the GPU work queued before it) count as idle. The steady calls run one after another on one stream
    inside the window, so busy <= window. No synchronisation while streaming: a chunk boundary reads only the spans
    whose events have completed (``query``); :meth:`busy` waits for the rest at the end.
    """

    def __init__(self, mark: Callable[[], torch.cuda.Event]) -> None:
        self._mark = mark
        self._pending: Deque[tuple] = deque()  # (start, end) events of steady calls not yet read
        self._window_start = self._last_end = None
        self._busy_ms = 0.0
        self.steady_chunks = 0

    @classmethod
    def for_device(cls, device: torch.device) -> Optional[_BusyMeter]:
        """A meter on the device's current stream, None off CUDA (no number rather than a made-up one)."""
        if device.type != 'cuda':
            return None

        def mark() -> torch.cuda.Event:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(device))
            return event

        return cls(mark)

    def wrap(self, call: FrameCall) -> FrameCall:
        """``call`` with events before its first piece is computed and after its last."""

        def timed(x: Tensor) -> Iterator[Tuple[slice, Tensor]]:
            start = self._mark()
            yield from call(x)
            self._last_end = self._mark()
            if self._window_start is not None:
                self._pending.append((start, self._last_end))

        return timed

    def chunk_done(self) -> None:
        """After the network calls of a chunk are queued."""
        if self._window_start is None:
            self._window_start = self._last_end
            return
        self.steady_chunks += 1
        self._read(wait=False)

    def _read(self, wait: bool) -> None:
        while self._pending and (wait or self._pending[0][1].query()):  # one stream: events complete in order
            start, end = self._pending.popleft()
            if wait:
                end.synchronize()
            self._busy_ms += start.elapsed_time(end)

    def busy(self) -> Optional[float]:
        """The steady busy share in [0, 1] once the stream has ended; None with a single chunk."""
        if not self.steady_chunks:
            return None
        self._read(wait=True)
        window_ms = self._window_start.elapsed_time(self._last_end)
        return min(1.0, self._busy_ms / window_ms) if window_ms > 0 else None  # min: the timer's rounding


def _crossfade(start: int, length: int, prev_end: Optional[int], next_start: Optional[int]) -> List[float]:
    """Temporal weights of chunk [start, start+length): linear ramps over its overlaps with the neighbours."""
    weights = []
    for f in range(start, start + length):
        w = 1.0
        if prev_end is not None and f < prev_end:  # fade in over the frames shared with the previous chunk
            w = min(w, (f - start + 1) / (prev_end - start + 1))
        if next_start is not None and f >= next_start:  # fade out over those shared with the next chunk
            w = min(w, (start + length - f) / (start + length - next_start + 1))
        weights.append(w)
    return weights


def _quantise(frame: Tensor) -> Tensor:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8 on the same device, rounded like BasicSR's tensor2img."""
    return frame.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).contiguous()


def _to_uint8(frame: Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8 host array."""
    return _quantise(frame).cpu().numpy()


def upscale_frames(
    frames: Iterable[np.ndarray],
    net: Callable[[Tensor], Tensor],
    *,
    scale: Optional[int] = None,
    chunk: int = DEFAULT_CHUNK,
    overlap: int = DEFAULT_OVERLAP,
    tile: Tile = DEFAULT_TILE,
    tile_overlap: int = DEFAULT_TILE_OVERLAP,
    precision: str = 'fp32',
    device: Union[str, torch.device, None] = None,
    name: str = 'input',
    tile_batch: int = 1,
    frame_count: Optional[int] = None,
) -> Iterator[np.ndarray]:
    """Stream RGB uint8 frames (H, W, 3) through the network; yields (s*H, s*W, 3) uint8 frames in order.

    See the module docstring for the chunking, blending and memory bounds. ``net`` must already be on
    ``device`` (default: the device of its parameters). ``name`` is used in error messages. ``tile`` is a side
    or (height, width). ``tile_batch`` tiles go through the network in one call (same output, more memory).
    ``frame_count``: the number of frames when known beforehand; chunks are then balanced (a wrong count only
    unbalances them). Raises :class:`InputError` for fewer than 2 frames, frames of mixed sizes or bad arguments.
    """
    _check_settings(chunk, overlap, tile, tile_overlap, precision)
    scale = scale or getattr(net, 'upscale', None)
    if not scale:
        raise ValueError('scale not given and the network has no `upscale` attribute')
    if device is None:
        param = next(iter(net.parameters()), None) if isinstance(net, nn.Module) else None
        device = param.device if param is not None else torch.device('cpu')
    device = torch.device(device)
    call = _network_call(net, scale, precision, device)
    if tile_batch < 1:
        raise InputError(f'--tile-batch {tile_batch}: must be >= 1')
    stream = _stream(frames, call, scale, chunk, overlap, tile, tile_overlap, device, name, tile_batch, frame_count)
    for frame in stream:
        yield _to_uint8(frame)


# autograd off while the streamer runs, not in its caller between frames: a no_grad block around the yields would
# leave it off in the caller, for good where a caller that stops early keeps the generator alive (a traceback)
@torch.no_grad()
def _stream(
    frames: Iterable[np.ndarray],
    call: FrameCall,
    scale: int,
    chunk: int,
    overlap: int,
    tile: Tile,
    tile_overlap: int,
    device: torch.device,
    name: str,
    tile_batch: int = 1,
    frame_count: Optional[int] = None,
    on_chunk: Optional[Callable[[], None]] = None,
) -> Iterator[Tensor]:
    """The streaming engine of :func:`upscale_frames`; yields unclamped float frames (C, s*H, s*W).

    ``chunk`` is the maximum chunk length; with ``frame_count`` given the chunks are balanced
    (:func:`gsmsr.tiling.chunk_length`). Chunk starts follow the official rule over the frames actually read, so
    a wrong count only unbalances the chunks. ``call`` is the network in pieces of frames (:func:`_network_call`): a
    frame is yielded as soon as no later piece or chunk changes it. ``on_chunk`` is called once a chunk's network
    calls are made.
    """
    source = iter(frames)
    buffer: deque = deque()  # LR frames [base, base + len(buffer))
    base, eof, size = 0, False, None

    def fill(end: int) -> None:  # read until frame end-1 is buffered or the input ends
        nonlocal eof, size
        while not eof and base + len(buffer) < end:
            frame = next(source, None)
            if frame is None:
                eof = True
                break
            if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
                raise InputError(
                    f'{name}: frame {base + len(buffer)} has shape {frame.shape} {frame.dtype}, '
                    'expected (H, W, 3) uint8'
                )
            if size is None:
                size = frame.shape[:2]
            elif frame.shape[:2] != size:
                raise InputError(
                    f'{name}: frame {base + len(buffer)} is {frame.shape[0]}x{frame.shape[1]}, '
                    f'earlier frames are {size[0]}x{size[1]}'
                )
            buffer.append(frame)

    fill(chunk if chunk else sys.maxsize)
    if len(buffer) < MIN_FRAMES:
        raise InputError(f'{name}: has {len(buffer)} frame(s); the network needs at least {MIN_FRAMES}')
    # a declared count below the frames already read is wrong: chunks of the maximum length then, as when unknown
    count = frame_count if frame_count is not None and frame_count >= len(buffer) else None
    length = min(chunk_length(count, chunk, overlap) or len(buffer), len(buffer))  # every chunk has this length
    stride = length - overlap if chunk else length
    h, w = size
    weight_map = tile_weight_map(h, w, scale, tile, tile_overlap, device=device)
    acc, wsum = None, torch.zeros(length, dtype=torch.float64)
    start, prev_end = 0, None
    while True:
        fill(start + length + stride)  # one stride ahead: tells where the next chunk starts
        total = base + len(buffer)
        if eof and total == start + length:
            next_start = None
        else:  # the official rule: the next stride, but never past the last full chunk
            next_start = min(start + stride, total - length) if eof else start + stride
        fw = _crossfade(start, length, prev_end, next_start)
        clip = np.stack([buffer[i] for i in range(start - base, start - base + length)])
        lq = torch.from_numpy(clip).to(device).permute(0, 3, 1, 2).unsqueeze(0).contiguous().float().div_(255)
        del clip
        wsum += torch.tensor(fw, dtype=torch.float64)
        done = length if next_start is None else next_start - start  # frames no later chunk touches
        weight = torch.tensor(fw, dtype=torch.float32)
        # each finished frame leaves as soon as its last piece is added: its copy to the host and encoding
        # overlap the network's work on the later frames of the chunk
        frames_done = tile_frames(call, lq, scale, tile, tile_overlap, acc, weight, tile_batch)
        for i, acc in frames_done:
            if i < done:
                yield acc[0, i] / weight_map / float(wsum[i])
        del lq
        if on_chunk is not None:
            on_chunk()
        if next_start is None:
            return
        for i in range(length - done):  # shift the unfinished frames to the front (forward copy is safe)
            acc[:, i].copy_(acc[:, i + done])
        acc[:, length - done :].zero_()
        wsum = torch.cat([wsum[done:], torch.zeros(done, dtype=torch.float64)])
        for _ in range(next_start - base):  # LR frames before the next chunk are no longer needed
            buffer.popleft()
        base = next_start
        prev_end, start = start + length, next_start


def _check_settings(
    chunk: Optional[int], overlap: int, tile: Optional[Tile], tile_overlap: int, precision: str
) -> None:
    """``tile`` / ``chunk`` None: chosen later (:func:`upscale_video`); the overlaps must then fit the fallbacks."""
    chunk = DEFAULT_CHUNK if chunk is None else chunk
    if chunk < 0 or chunk == 1:
        raise InputError(f'--chunk {chunk}: must be 0 (whole video) or at least {MIN_FRAMES}')
    if overlap < 0 or (chunk and overlap >= chunk):
        raise InputError(f'--overlap {overlap}: must be >= 0 and smaller than --chunk {chunk}')
    tile = DEFAULT_TILE if tile is None else tile
    sides = tile_sides(tile)
    if any(side < 0 for side in sides):
        raise InputError(f'--tile {tile}: must be 0 (no tiling) or positive')
    if tile_overlap < 0 or any(side and tile_overlap >= side for side in sides):
        raise InputError(f'--tile-overlap {tile_overlap}: must be >= 0 and smaller than --tile {tile}')
    if precision not in PRECISIONS:
        raise InputError(f'--precision {precision}: choose one of {", ".join(PRECISIONS)}')


def _plan_tiling(
    tile: Optional[Tile],
    tile_batch: Optional[int],
    height: int,
    width: int,
    frames: int,
    scale: int,
    tile_overlap: int,
    precision: str,
    compiled: bool,
    device: torch.device,
    memory_share: float = 1.0,
) -> Tuple[Tile, int]:
    """Fill in a tile / tile batch left to choose (None): from ``memory_share`` of the free memory on CUDA, else
    the fixed defaults."""
    free = _free_bytes(device, memory_share) if tile is None else None
    if free is None:
        return (DEFAULT_TILE if tile is None else tile), tile_batch or 1
    return choose_tiling(
        free, height, width, frames, scale, tile_overlap, precision, compiled=compiled, tile_batch=tile_batch
    )


def _plan_chunk(
    chunk: Optional[int],
    tile: Optional[Tile],
    frames: Optional[int],
    height: int,
    width: int,
    overlap: int,
    scale: int,
    precision: str,
    compiled: bool,
    device: torch.device,
    memory_share: float = 1.0,
) -> int:
    """The maximum chunk length: ``chunk`` when given; left to choose (None), DEFAULT_CHUNK, or on CUDA with the
    tiling left to choose and the frame count known, the maximum up to AUTO_CHUNK_MAX frames and AUTO_CHUNK_PIXELS
    that gives the fewest balanced chunks of whole frames with the estimated peak (SWSA over each whole chunk) under
    the headroom (:mod:`gsmsr.memory_plan`), the shortest such maximum (it is then the chunks' length). Only where
    whole frames already fit at DEFAULT_CHUNK: otherwise the frame is tiled for DEFAULT_CHUNK as before (a second
    spatial tile costs less than shorter chunks' shared frames)."""
    if chunk is not None:
        return chunk
    free = _free_bytes(device, memory_share) if tile is None and frames else None
    if free is None:
        return DEFAULT_CHUNK
    longest = min(AUTO_CHUNK_MAX, max(DEFAULT_CHUNK, AUTO_CHUNK_PIXELS // (height * width)))

    def fits(limit: int) -> bool:
        length = chunk_length(frames, limit, overlap)
        peak = estimate_peak_bytes(
            (height, width), 1, height, width, length, scale, precision, compiled, whole_swsa=True
        )
        return peak <= HEADROOM * free

    if not fits(DEFAULT_CHUNK):
        return DEFAULT_CHUNK
    # a longer maximum with as many chunks only makes them longer, not fewer: the first frame would wait longer
    best = DEFAULT_CHUNK
    for limit in range(DEFAULT_CHUNK + 1, longest + 1):
        if chunk_count(frames, limit, overlap) < chunk_count(frames, best, overlap) and fits(limit):
            best = limit
    return best


def _free_bytes(device: torch.device, memory_share: float) -> Optional[int]:
    """``memory_share`` of the device memory this process can still allocate; None off CUDA."""
    free = free_device_bytes(device)
    return None if free is None else int(free * memory_share)


def _describe_plan(
    sides: Tuple[int, int],
    tile_batch: int,
    info,
    length: int,
    scale: int,
    precision: str,
    compiled: bool,
    whole_swsa: bool,
    device: torch.device,
    memory_share: float = 1.0,
) -> str:
    """The network calls' shape and, on CUDA, the planned peak against the free memory (for the out-of-memory
    message: a plan that did not fit is what a user or a bug report needs to see)."""
    text = (
        f'{info.height}x{info.width} frames in tiles of {sides[0]}x{sides[1]}, {tile_batch} a call, '
        f'chunks of {length} frames, {precision}, SWSA over {"whole chunks" if whole_swsa else "slabs"}'
    )
    free = _free_bytes(device, memory_share)
    if free is None:
        return text
    peak = estimate_peak_bytes(
        sides, tile_batch, info.height, info.width, length, scale, precision, compiled, whole_swsa
    )
    of = 'free' if memory_share == 1 else f'planned ({memory_share:.0%} of the free memory)'
    return f'{text}; estimated peak {peak / 2**30:.1f} GiB of {free / 2**30:.1f} GiB {of}'


def _whole_chunk_swsa(
    net: nn.Module,
    sides: Tuple[int, int],
    tile_batch: int,
    height: int,
    width: int,
    length: int,
    scale: int,
    precision: str,
    compiled: bool,
    device: torch.device,
    memory_share: float = 1.0,
) -> bool:
    """Whether to run the SWSA groups once over each whole chunk (``net.stream_whole`` raised to the chunk length):
    on CUDA, for whole frames (no tiling, so the memory a tile could use is not taken) and where the estimated peak
    stays under the headroom (:func:`gsmsr.memory_plan.whole_chunk_swsa_fits`). Slabs recompute a halo of frames on
    each side, so a chunk longer than ``stream_whole`` runs SWSA over about twice its frames in slabs. ``sides``:
    the tile's (height, width) within the frame."""
    stream_whole = getattr(net, 'stream_whole', None)
    if stream_whole is None or length <= stream_whole or sides != (height, width):
        return False
    free = _free_bytes(device, memory_share)
    return free is not None and whole_chunk_swsa_fits(
        free, sides, tile_batch, height, width, length, scale, precision, compiled
    )


def upscale_video(
    input_path: str,
    output_path: str,
    net: nn.Module,
    *,
    scale: Optional[int] = None,
    chunk: Optional[int] = None,
    overlap: int = DEFAULT_OVERLAP,
    tile: Optional[Tile] = None,
    tile_overlap: int = DEFAULT_TILE_OVERLAP,
    precision: str = 'fp32',
    device: Union[str, torch.device, None] = None,
    force: bool = False,
    fps: Optional[float] = None,
    progress: bool = True,
    tile_batch: Optional[int] = None,
    timeline: Optional[Dict[str, float]] = None,
) -> InferenceStats:
    """Upscale a video file or folder of frames into a video file (codec by extension, same frame rate,
    audio copied) or a PNG folder (extension-less path). The network is moved to ``device``.

    ``chunk`` None: DEFAULT_CHUNK, or longer on CUDA where whole frames of longer chunks fit (:func:`_plan_chunk`).
    ``tile`` / ``tile_batch`` None: chosen from the free memory on CUDA (:mod:`gsmsr.memory_plan`), else 256 / 1;
    if that plan runs out of GPU memory before the first frame is written, the run starts again planned for half
    the memory (at most ``MEMORY_RETRIES`` times; new tile shapes compile anew), else :class:`DeviceMemoryError`.
    With ``net.compile_blocks`` on CUDA the compile caches persist (:mod:`gsmsr.compile_cache`).
    The output is written under a hidden temporary name and renamed at the end; on any error it is
    removed. An existing output is replaced only with ``force``. ``fps`` sets the rate of a video made from
    a folder (default 25). Raises :class:`InputError` for bad input. ``timeline``: the launch timeline so far (the
    CLI's); the run adds its phases from ``caches_ready`` on (:data:`TIMELINE`) to a copy, ``stats.timeline``.
    """
    _check_settings(chunk, overlap, tile, tile_overlap, precision)
    if tile_batch is not None and tile_batch < 1:
        raise InputError(f'--tile-batch {tile_batch}: must be >= 1')
    device = resolve_device(device)
    run = functools.partial(
        _upscale_video_once, input_path, output_path, net, scale=scale, chunk=chunk, overlap=overlap, tile=tile,
        tile_overlap=tile_overlap, precision=precision, device=device, force=force, fps=fps, progress=progress,
        tile_batch=tile_batch, timeline=timeline,
    )  # fmt: skip
    share = 1.0
    for retries_left in range(MEMORY_RETRIES, -1, -1):
        try:
            return run(memory_share=share)
        except DeviceMemoryError as err:
            if not (err.retry and retries_left):
                raise
            plan = err.plan
        # out of the except block: the failed attempt's tensors are no longer referenced from its traceback
        gc.collect()
        torch.cuda.empty_cache()
        share /= 2
        print(f'{PROG}: out of GPU memory ({plan}); starting again, tiled for {share:.0%} of it', file=sys.stderr)
    raise AssertionError('unreachable')


def _upscale_video_once(
    input_path: str,
    output_path: str,
    net: nn.Module,
    *,
    scale: Optional[int],
    chunk: Optional[int],
    overlap: int,
    tile: Optional[Tile],
    tile_overlap: int,
    precision: str,
    device: torch.device,
    force: bool,
    fps: Optional[float],
    progress: bool,
    tile_batch: Optional[int],
    timeline: Optional[Dict[str, float]],
    memory_share: float,
) -> InferenceStats:
    """One attempt of :func:`upscale_video`, its automatic tiling planned for ``memory_share`` of the free memory."""
    from tqdm import tqdm

    timeline = dict(timeline or {})
    planned = tile is None and _free_bytes(device, memory_share) is not None  # tiled from the free memory
    check_output(output_path, input_path, force)
    source = open_source(input_path)
    reader = writer = sink = None
    count = 0
    whole_swsa, own_stream_whole = False, None
    plan = PLAN_PENDING
    try:
        info = source.info
        scale = scale or getattr(net, 'upscale', None)
        if not scale:
            raise ValueError('scale not given and the network has no `upscale` attribute')
        rate = info.rate or (Fraction(fps).limit_denominator(1001) if fps else None)
        net = net.to(device)
        compiled = bool(getattr(net, 'compile_blocks', False)) and device.type == 'cuda'
        mega = None
        if compiled:  # before the first compilation: it reads the cache folders then
            root = enable_persistent_caches()
            mega = MegaCache.for_device(device)
            mega.load()
            if os.environ.get(AOT_ENV, '1') != '0' and hasattr(net, 'precompile_dir'):
                net.precompile_dir = str(root / 'aot')
        timeline['caches_ready'] = time.time()
        host_peak_at = {'caches_ready': _host_peak()}
        precompiled_before = _precompiled_seconds(net) if compiled else None  # a network reused across runs
        phases_before = _compile_phases() if compiled else {}
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        chunk = _plan_chunk(
            chunk, tile, info.frames, info.height, info.width, overlap, scale, precision, compiled, device,
            memory_share,
        )  # fmt: skip
        # frames per network call, as _stream will choose them (an unknown count with chunk 0: planned for the default)
        length = chunk_length(info.frames, chunk, overlap) or info.frames or DEFAULT_CHUNK
        tile, tile_batch = _plan_tiling(
            tile, tile_batch, info.height, info.width, length, scale, tile_overlap, precision, compiled, device,
            memory_share,
        )  # fmt: skip
        sides = tuple(min(t, n) if t else n for t, n in zip(tile_sides(tile), (info.height, info.width)))
        whole_swsa = _whole_chunk_swsa(
            net, sides, tile_batch, info.height, info.width, length, scale, precision, compiled, device, memory_share
        )
        if whole_swsa:  # the caller's setting comes back at the end
            own_stream_whole = net.__dict__.get('stream_whole')
            net.stream_whole = length
        plan = _describe_plan(
            sides, tile_batch, info, length, scale, precision, compiled, whole_swsa, device, memory_share
        )
        sink = open_sink(
            output_path,
            scale * info.width,
            scale * info.height,
            rate,
            audio_from=input_path if info.has_audio else None,
        )
        started = time.perf_counter()
        timeline['stream_start'] = time.time()
        host_peak_at['stream_start'] = _host_peak()
        call_shape = (tile_batch, length, 3, *sides)
        kernels_done = _kernels_done(call_shape, precision, device) if device.type == 'cuda' else None
        _compile_kernels_ahead(net, call_shape, precision, device, kernels_done)
        first_written: List[Tuple[float, float]] = []  # (seconds since started, Unix time)

        def write(rgb: np.ndarray, tag) -> None:  # in a writer thread
            sink.write(rgb, tag)
            if not first_written:  # one append of both: several writer threads may race here
                first_written.append((time.perf_counter() - started, time.time()))

        frame_bytes = 3 * scale * scale * info.height * info.width
        stride = length - overlap if chunk else length  # frames finished per chunk
        writer = FrameWriter(
            write,
            threads=WRITER_THREADS if output_kind(output_path) == 'folder' else 1,
            depth=max(2, min(stride, WRITE_AHEAD_BYTES // frame_bytes)),
        )
        reader = ReadAhead(source, READ_AHEAD)
        tags: deque = deque()  # source tags of the frames in flight, consumed in order by the writer

        def frames() -> Iterator[np.ndarray]:
            for rgb, tag in reader:
                tags.append(tag)
                yield rgb

        call = _network_call(net, scale, precision, device)
        meter = _BusyMeter.for_device(device)
        if meter is not None:
            call = meter.wrap(call)

        def chunk_done() -> None:  # the chunk's network calls are made (queued on CUDA)
            if 'first_chunk_queued' not in timeline:
                timeline['first_chunk_queued'] = time.time()
                host_peak_at['first_chunk_queued'] = _host_peak()
            if meter is not None:
                meter.chunk_done()

        with tqdm(
            total=info.frames,
            unit='frame',
            disable=not progress,
            file=sys.stderr,
            dynamic_ncols=True,
            desc=os.path.basename(os.path.normpath(input_path)),
        ) as bar:
            stream = _stream(
                frames(),
                call,
                scale,
                chunk,
                overlap,
                tile,
                tile_overlap,
                device,
                input_path,
                tile_batch,
                info.frames,
                on_chunk=chunk_done,
            )
            for out in stream:
                writer.submit(_quantise(out), tags.popleft())
                del out
                count += 1
                if count == 1:  # the first chunk compiled everything there is
                    if mega is not None:
                        mega.save()
                        for fn in getattr(net, 'precompiled', ()):
                            print(f'{PROG}: {fn.name}: {"; ".join(fn.events)}', file=sys.stderr)
                    if kernels_done is not None:
                        kernels_done.set()
                bar.update(1)
        writer.finish()
        writer = None
        sink.commit()
        sink = None
        seconds = time.perf_counter() - started
        host_peak_at['stream_end'] = _host_peak()
        busy = meter.busy() if meter is not None else None  # every frame is on the host: nothing left to wait for
        precompiled = _precompiled_seconds(net) if compiled else None
        if precompiled is not None and precompiled_before is not None:
            precompiled = {k: round(v - precompiled_before[k], 3) for k, v in precompiled.items()}
        phases = _compile_phases_since(phases_before) if compiled else {}
        if first_written:
            timeline['first_frame_written'] = first_written[0][1]
    except torch.cuda.OutOfMemoryError as err:
        retry = planned and count == 0 and plan != PLAN_PENDING
        raise DeviceMemoryError(plan, one_line(err, 300), retry) from err
    finally:  # threads stop before the source closes and the sink is aborted
        if whole_swsa:
            if own_stream_whole is None:
                del net.stream_whole  # the class's value again
            else:
                net.stream_whole = own_stream_whole
        if reader is not None:
            reader.close()
        source.close()
        if writer is not None:
            writer.abort()
        if sink is not None:
            sink.abort()
    return InferenceStats(
        output=output_path,
        frames=count,
        in_size=(info.height, info.width),
        out_size=(scale * info.height, scale * info.width),
        seconds=seconds,
        peak_host_bytes=host_peak_at['stream_end'],
        peak_device_bytes=torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else None,
        first_frame_seconds=first_written[0][0] if first_written else None,
        first_frame_at=first_written[0][1] if first_written else None,
        tile=sides,
        tile_batch=tile_batch,
        chunk=length,
        swsa_whole_chunk=whole_swsa,
        gpu_busy_steady=busy,
        steady_chunks=meter.steady_chunks if meter is not None else None,
        precompiled_s=precompiled,
        timeline=timeline,
        host_peak_at=host_peak_at,
        compile_phases=phases,
    )


def _host_peak() -> int:
    """The process's peak resident set size so far, in bytes (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


COMPILE_PHASE_MIN_S = 0.5


def _compile_phases() -> Dict[str, List[float]]:
    """Dynamo's and Inductor's timed compile phases so far: name -> seconds of each call
    (``torch._dynamo.utils.compilation_time_metrics``; empty where this torch has none)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:
        return {}
    return {name: list(times) for name, times in compilation_time_metrics.items()}


def _compile_phases_since(before: Dict[str, List[float]]) -> Dict[str, List[float]]:
    """The calls of each phase after ``before`` (:func:`_compile_phases`), for the phases that took at least
    COMPILE_PHASE_MIN_S in them."""
    calls = {name: times[len(before.get(name, ())) :] for name, times in _compile_phases().items()}
    return {name: [round(t, 3) for t in times] for name, times in calls.items() if sum(times) >= COMPILE_PHASE_MIN_S}


def _precompiled_seconds(net: nn.Module) -> Optional[Dict[str, float]]:
    """Load, compile and first-call seconds of ``net.precompiled`` (GSMNet's PrecompiledFunctions) summed, or None."""
    fns = [fn for fn in getattr(net, 'precompiled', ()) if hasattr(fn, 'seconds')]
    if not fns:
        return None
    return {k: round(sum(fn.seconds[k] for fn in fns), 3) for k in fns[0].seconds}


# ----------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('input', help='video file (anything FFmpeg decodes) or folder of frames')
    parser.add_argument(
        '-o',
        '--output',
        required=True,
        help='video file (.mp4/.mkv/.mov/.avi/.webm; same frame rate, audio copied) '
        'or a folder name without extension for PNG frames',
    )
    parser.add_argument(
        '--weights',
        help='checkpoint: BasicSR (params_ema preferred, then params) or official '
        '(default: path.pretrain_network_g of -opt)',
    )
    parser.add_argument(
        '-opt', '--opt', help='BasicSR options YAML whose network_g is used (default: the released x4 model)'
    )
    parser.add_argument(
        '--chunk',
        type=int,
        help='maximum frames per temporal chunk; chunks are balanced to the same length when the frame count '
        f'is known; 0 = whole video in one (default: {DEFAULT_CHUNK}, or on CUDA up to {AUTO_CHUNK_MAX} where '
        'whole frames of longer chunks fit in 90%% of the free GPU memory: fewer frames shared by chunks)',
    )
    parser.add_argument(
        '--overlap',
        type=int,
        default=DEFAULT_OVERLAP,
        help=f'frames shared by consecutive chunks, cross-faded (default {DEFAULT_OVERLAP})',
    )
    parser.add_argument(
        '--tile',
        type=int,
        help='LR tile side, 0 = whole frame (default: on CUDA the tile that computes the fewest pixels within '
        f'90%% of the free GPU memory, up to the whole frame; else {DEFAULT_TILE})',
    )
    parser.add_argument(
        '--tile-overlap',
        type=int,
        default=DEFAULT_TILE_OVERLAP,
        help=f'LR overlap between tiles (default {DEFAULT_TILE_OVERLAP})',
    )
    parser.add_argument(
        '--precision',
        choices=['auto', *PRECISIONS],
        default='auto',
        help='network precision; bf16/fp16 use autocast, geometry stays fp32 '
        '(default auto: bf16 on CUDA, fp32 elsewhere)',
    )
    parser.add_argument(
        '--compile',
        action=argparse.BooleanOptionalAction,
        default=None,
        help='torch.compile the window step and SWSA blocks (default: on with CUDA; the first '
        'chunk then takes a minute or two longer, per tile size)',
    )
    parser.add_argument(
        '--tile-batch',
        type=int,
        help='tiles per network call (default: chosen with the tile on CUDA, else 1); more fill a large GPU '
        'better, same output',
    )
    parser.add_argument(
        '--stats-json',
        help='also write the run statistics (speed, memory, tiling; timeline, the Unix times of the start-up phases '
        'from the process start to the first frame written; on CUDA gpu_busy_steady, the share of the time after '
        'the first chunk in which the GPU runs the network) to this file',
    )
    parser.add_argument('--device', help='torch device (default: cuda if available, else cpu)')
    parser.add_argument('--fps', type=float, help='frame rate of a video made from a folder (default 25)')
    parser.add_argument('--force', action='store_true', help='overwrite an existing output')
    parser.add_argument('--no-progress', dest='progress', action='store_false', help='hide the progress bar')


def run(args: argparse.Namespace) -> int:
    """Exit codes: 0 done, 2 bad input or arguments, 1 environment (disk full, write error, out of memory) or
    unexpected failure, 128 + signal number for SIGINT / SIGTERM / SIGHUP. Never a partial output."""
    return run_reporting_errors(
        PROG, lambda: _run(args), 'interrupted, no output written', debug=getattr(args, 'debug', False)
    )


PROG = 'gsmsr infer'
MIN_FPS, MAX_FPS = 0.01, 1000.0  # a folder's frame rate must survive Fraction.limit_denominator(1001)


def _planned_scale(opt: Optional[str]) -> int:
    """The network's upscale factor from the options alone (before it loads), for the free-space estimate."""
    network_opt = _read_options(opt).get('network_g') or DEFAULT_NETWORK
    scale = network_opt.get('upscale', DEFAULT_NETWORK['upscale']) if isinstance(network_opt, dict) else None
    return scale if isinstance(scale, int) and scale > 0 else DEFAULT_NETWORK['upscale']


def _check_output_space(output: str, info, chunk: Optional[int], scale: int) -> None:
    """The first chunk's frames must fit on the output's file system (checked before the network loads; a
    whole-video chunk, 0, is checked for its first DEFAULT_CHUNK frames, one left to choose for its longest)."""
    first = AUTO_CHUNK_MAX if chunk is None else chunk or DEFAULT_CHUNK
    frames = min(f for f in (first, info.frames) if f)
    needed = estimated_output_bytes(output, scale * info.width, scale * info.height, frames)
    check_free_space(os.path.dirname(os.path.abspath(output)), needed, output)


def _check_stats_path(path: str, input_path: str, output: str) -> None:
    """``--stats-json`` is replaced after the run: never the input, a file in the input folder or the output itself
    (links resolved, :func:`gsmsr.faults.input_overlap`); a folder, or one that cannot be written (the nearest
    existing one: the write creates the rest), is refused now rather than after the run."""
    overlap = input_overlap(path, input_path)
    if overlap is not None:
        raise InputError(f'--stats-json {path}: {overlap} {input_path}')
    if input_overlap(path, output) == 'is the input':
        raise InputError(f'--stats-json {path}: is the output {output}')
    if os.path.isdir(path):
        raise InputError(f'--stats-json {path}: is a folder')
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    check_writable(folder, f'--stats-json {path}')


def _hash_triton_in_background() -> Optional[threading.Thread]:
    """Start computing, in a daemon thread, the digest of Triton's own files: part of the key of every Triton cache
    entry, computed once a process at the first kernel looked up (~0.5 s of the H200 machine's host, inside the first
    chunk's start-up while the GPU waits: ``bench_infer.py --gpu-waits``). Hashing releases the GIL, so started
    before the network is built it overlaps the weights' load, the device's start and the first frames' decoding.
    Nothing is imported here that the main thread may be importing at the same time (a partly imported module could
    reach it); a failure only leaves the digest to its first use."""
    try:
        from triton.runtime.cache import triton_key
    except ImportError:  # no Triton, or another layout of it
        return None

    def digest() -> None:
        try:
            triton_key()
        except Exception:  # computed again, and reported, where Triton needs it
            pass

    thread = threading.Thread(target=digest, name='gsmsr-triton-key', daemon=True)
    thread.start()
    return thread


def _run(args: argparse.Namespace) -> int:
    timeline, process_start_source = launch_timeline()
    timeline['imports_done'] = IMPORTS_DONE
    device = resolve_device(args.device)
    timeline['device_chosen'] = time.time()
    if device.type == 'cuda':
        _hash_triton_in_background()
    if args.precision == 'auto':  # the fast default on GPUs: bf16 (PSNR ~75 dB against fp32, benchmarks/NOTES.md)
        args.precision = 'bf16' if device.type == 'cuda' else 'fp32'
    _check_settings(args.chunk, args.overlap, args.tile, args.tile_overlap, args.precision)
    if args.fps is not None and not (math.isfinite(args.fps) and MIN_FPS <= args.fps <= MAX_FPS):
        raise InputError(f'--fps {args.fps}: must be between {MIN_FPS} and {MAX_FPS:.0f}')
    if args.tile_batch is not None and args.tile_batch < 1:
        raise InputError(f'--tile-batch {args.tile_batch}: must be >= 1')
    # Cheap checks first, so that bad paths, an unwritable folder or a full disk fail before the network loads.
    check_output(args.output, args.input, args.force)
    if args.stats_json:
        _check_stats_path(args.stats_json, args.input, args.output)
    source = open_source(args.input)
    source.close()
    _check_output_space(args.output, source.info, args.chunk, _planned_scale(args.opt))
    timeline['input_probed'] = time.time()
    net = load_network(args.weights, args.opt, device, timeline)
    if hasattr(net, 'compile_blocks'):
        net.compile_blocks = device.type == 'cuda' if args.compile is None else args.compile
    stats = upscale_video(
        args.input,
        args.output,
        net,
        chunk=args.chunk,
        overlap=args.overlap,
        tile=args.tile,
        tile_overlap=args.tile_overlap,
        precision=args.precision,
        device=device,
        tile_batch=args.tile_batch,
        force=args.force,
        fps=args.fps,
        progress=args.progress,
        timeline=timeline,
    )
    with output_complete(args.output):
        stats.process_start_source = process_start_source
        print(f'{PROG}: {stats.summary()}', file=sys.stderr)
        if args.stats_json:
            atomic_write_text(args.stats_json, stats.to_json())
    return 0
