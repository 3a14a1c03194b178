"""``gsmsr stress-flow``: how much does GSMNet rely on its optical flow? PSNR/SSIM under perturbed flows.

The adjacent-frame SpyNet flows (``flows_backward`` / ``flows_forward``, (B, T-1, 2, H, W), channel 0 = x, in LR
pixels) are perturbed through the network's ``flow_transform`` hook, i.e. before every gather (implicit warp),
scatter (flow warp) and multi-hop composition uses them. Two one-dimensional sweeps are run around the clean
network:

* **noise**: i.i.d. Gaussian noise of standard deviation ``sigma`` LR pixels added to each component (x and y) of
  every flow vector;
* **dropout**: *pixel-wise* flow dropout: every flow vector (both components of one pixel of one field) is set
  to zero independently with probability ``p``. Pixel-wise rather than frame-wise: a short test clip has only a
  few flow fields, so whole-field dropout would turn the curve into a handful of coin flips, while pixel-wise
  dropout averages over millions of vectors and still ends at "no motion information" for ``p = 1``.

Both directions and every field are perturbed independently. The random numbers are drawn from a generator
seeded by ``(--seed, clip name)`` and reset for every clip and every condition, in a fixed order (a normal draw
for the noise, then a uniform draw for the dropout mask, for each field). So a run is reproducible, a clip's
perturbation does not depend on the other clips or conditions, and the levels of one sweep share their random
numbers (noise = sigma * z with the same z; the dropout masks are nested, a larger p drops a superset): the curve
measures the effect of the level, not a new random draw. ``sigma = 0`` and ``p = 0`` leave the flows exactly
unchanged. With tiling, every tile's network call draws its own perturbation.

Evaluation follows the test protocol: :func:`gsmsr.tiling.forward_chunked` (``--chunk`` / ``--tile``), output
clamped to [0, 1] and quantised to uint8 (BasicSR's ``tensor2img``), BasicSR's ``calculate_psnr`` /
``calculate_ssim`` (crop border 0, RGB or ``--y`` channel) per frame, averaged per clip, then over clips.

Outputs in ``--out``: ``stress_flow.txt`` (the printed table), ``stress_flow.csv`` and ``stress_flow.png`` (the
curves, drawn with OpenCV), each written atomically after all conditions have been evaluated.

Python API: :class:`FlowPerturbation` (the hook), :func:`perturbed_flows` (installs it, restores the previous
hook), :func:`find_clips` / :func:`load_clip` (REDS-layout test sets), :func:`stress_test` (the sweeps) and
:func:`write_report`.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch import Tensor

from gsmsr.archs import GSMNet
from gsmsr.archs.gsmnet_arch import MIN_SIZE
from gsmsr.faults import InputError, run_reporting_errors
from gsmsr.inference import load_network
from gsmsr.utils import atomic_write_bytes, resolve_device

__all__ = [
    'FlowPerturbation',
    'perturbed_flows',
    'Condition',
    'ClipFiles',
    'find_clips',
    'load_clip',
    'StressResult',
    'stress_test',
    'format_table',
    'plot_curves',
    'write_report',
    'parse_levels',
    'add_arguments',
    'run',
]

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')
METRIC_NAMES = ('psnr', 'ssim')
REPORT_NAMES = {'table': 'stress_flow.txt', 'csv': 'stress_flow.csv', 'plot': 'stress_flow.png'}
SWEEP_LABELS = {'noise': 'noise std (LR px)', 'dropout': 'dropout probability'}


# ----------------------------------------------------------------------------------------------- perturbation
class FlowPerturbation:
    """``GSMNet.flow_transform`` hook: Gaussian noise and pixel-wise dropout on the flow fields.

    noise_std: standard deviation in LR pixels, per flow component. dropout: probability that a flow vector is
    zeroed. seed: seeds the generator (per device); :meth:`reseed` restarts the random stream.
    Call: (flows_backward, flows_forward), each (B, T-1, 2, H, W) -> the perturbed pair, same shapes and dtypes.
    """

    def __init__(self, noise_std: float = 0.0, dropout: float = 0.0, seed: int = 0) -> None:
        if not (math.isfinite(noise_std) and noise_std >= 0):
            raise ValueError(f'noise std must be a finite number >= 0, got {noise_std}')
        if not 0 <= dropout <= 1:
            raise ValueError(f'dropout probability must be in [0, 1], got {dropout}')
        self.noise_std = float(noise_std)
        self.dropout = float(dropout)
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        self.seed = int(seed)
        self._generators: Dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def perturb(self, flow: Tensor) -> Tensor:
        """One flow tensor (B, N, 2, H, W) -> perturbed copy (or ``flow`` itself when both levels are 0)."""
        g = self._generator(flow.device)
        # Both draws always happen, in this order, so that every level sees the same random numbers.
        z = torch.randn(flow.shape, generator=g, device=flow.device, dtype=flow.dtype)
        u = torch.rand((*flow.shape[:2], 1, *flow.shape[3:]), generator=g, device=flow.device, dtype=flow.dtype)
        out = flow
        if self.noise_std > 0:
            out = out + self.noise_std * z
        if self.dropout > 0:
            out = out.masked_fill(u < self.dropout, 0.0)
        return out

    def __call__(self, flows_backward: Tensor, flows_forward: Tensor) -> Tuple[Tensor, Tensor]:
        return self.perturb(flows_backward), self.perturb(flows_forward)

    def __repr__(self) -> str:
        return f'FlowPerturbation(noise_std={self.noise_std}, dropout={self.dropout}, seed={self.seed})'


@contextlib.contextmanager
def perturbed_flows(
    net: torch.nn.Module, transform: Optional[Callable[[Tensor, Tensor], Tuple[Tensor, Tensor]]]
) -> Iterator[torch.nn.Module]:
    """Install ``transform`` as ``net.flow_transform``; the previous hook is restored on exit, errors included."""
    if not hasattr(net, 'flow_transform'):
        raise TypeError(f'{type(net).__name__} has no flow_transform hook (GSMNet needed)')
    previous = net.flow_transform
    net.flow_transform = transform
    try:
        yield net
    finally:
        net.flow_transform = previous


@dataclass(frozen=True)
class Condition:
    """One evaluated setting: noise std (LR px) and dropout probability."""

    noise: float = 0.0
    dropout: float = 0.0


def clip_seed(seed: int, clip: str) -> int:
    """Seed of a clip's perturbation: depends only on ``seed`` and the clip's name."""
    return int(np.random.SeedSequence([seed, zlib.crc32(clip.encode('utf-8'))]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------- test set
@dataclass
class ClipFiles:
    """One clip of a REDS-layout test set: frame file names shared by ``lq_dir`` and ``gt_dir``."""

    name: str
    lq_dir: str
    gt_dir: str
    frames: List[str]


def _frame_files(folder: str) -> List[str]:
    return sorted(
        f
        for f in os.listdir(folder)
        if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f))
    )


def find_clips(gt_root: str, lq_root: str, max_frames: int = 0) -> List[ClipFiles]:
    """Clips of ``<root>/<clip>/<frame>.<ext>`` (sorted), the first ``max_frames`` frames (0 = all) of each.

    Every LR clip needs a GT clip with the same frame file names and at least 2 frames. Raises InputError.
    """
    for flag, root in (('--gt', gt_root), ('--lq', lq_root)):
        if not os.path.isdir(root):
            raise InputError(f'{flag} {root}: no such directory')
    if max_frames < 0 or max_frames == 1:
        raise InputError(f'--max-frames {max_frames}: must be 0 (all frames) or at least 2')
    names = sorted(d for d in os.listdir(lq_root) if os.path.isdir(os.path.join(lq_root, d)))
    if not names:
        raise InputError(f'--lq {lq_root}: no clip folders (expected {lq_root}/<clip>/<frame>.png)')
    clips = []
    for name in names:
        lq_dir, gt_dir = os.path.join(lq_root, name), os.path.join(gt_root, name)
        if not os.path.isdir(gt_dir):
            raise InputError(f'{gt_dir}: no GT folder for LR clip {name}')
        frames = _frame_files(lq_dir)
        if max_frames:
            frames = frames[:max_frames]
        if len(frames) < 2:
            raise InputError(f'{lq_dir}: {len(frames)} frame(s); GSMNet needs at least 2')
        missing = [f for f in frames if not os.path.isfile(os.path.join(gt_dir, f))]
        if missing:
            raise InputError(
                f'{os.path.join(gt_dir, missing[0])}: missing GT frame'
                + (f' (and {len(missing) - 1} more)' if len(missing) > 1 else '')
            )
        clips.append(ClipFiles(name, lq_dir, gt_dir, frames))
    return clips


def _read_bgr(path: str) -> np.ndarray:
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise InputError(f'{path}: cannot read image')
    return img


def load_clip(clip: ClipFiles, scale: int, min_size: int = 0) -> Tuple[Tensor, List[np.ndarray]]:
    """LR frames as (T, 3, H, W) float32 RGB in [0, 1] and GT frames as uint8 BGR (s*H, s*W, 3).

    Raises InputError naming the file whose size differs from the clip's first LR frame (times ``scale`` for GT)
    or whose LR side is below ``min_size``.
    """
    from basicsr.utils import img2tensor

    lqs, gts = [], []
    for frame in clip.frames:
        lq_path, gt_path = os.path.join(clip.lq_dir, frame), os.path.join(clip.gt_dir, frame)
        lq, gt = _read_bgr(lq_path), _read_bgr(gt_path)
        if lqs and lq.shape != lqs[0].shape:
            raise InputError(
                f"{lq_path}: {lq.shape[0]}x{lq.shape[1]}, but the clip's first LR frame is "
                f'{lqs[0].shape[0]}x{lqs[0].shape[1]}'
            )
        if gt.shape[:2] != (scale * lq.shape[0], scale * lq.shape[1]):
            raise InputError(
                f'{gt_path}: GT is {gt.shape[0]}x{gt.shape[1]}, expected {scale}x the LR frame '
                f'{lq.shape[0]}x{lq.shape[1]} = {scale * lq.shape[0]}x{scale * lq.shape[1]}'
            )
        if min(lq.shape[:2]) < min_size:
            raise InputError(
                f'{lq_path}: LR frame {lq.shape[0]}x{lq.shape[1]} is smaller than the '
                f'{min_size}x{min_size} the network needs'
            )
        lqs.append(lq)
        gts.append(gt)
    tensors = img2tensor([img.astype(np.float32) / 255.0 for img in lqs], bgr2rgb=True, float32=True)
    return torch.stack(tensors), gts


# ----------------------------------------------------------------------------------------------- evaluation
@dataclass
class StressResult:
    """Scores of every condition: ``overall[c]`` (M,) and ``per_clip[c][clip]`` (M,), M = len(METRIC_NAMES)."""

    noise_levels: List[float]
    dropout_levels: List[float]
    seed: int
    y_channel: bool
    clips: List[str] = field(default_factory=list)
    frames: int = 0
    per_clip: Dict[Condition, Dict[str, np.ndarray]] = field(default_factory=dict)
    overall: Dict[Condition, np.ndarray] = field(default_factory=dict)

    @property
    def clean(self) -> np.ndarray:
        return self.overall[Condition()]

    def rows(self) -> List[Tuple[str, float, Condition]]:
        """(sweep, level, condition) in report order: the noise sweep, then the dropout sweep."""
        return [('noise', s, Condition(noise=s)) for s in self.noise_levels] + [
            ('dropout', p, Condition(dropout=p)) for p in self.dropout_levels
        ]


def conditions_of(noise_levels: Sequence[float], dropout_levels: Sequence[float]) -> List[Condition]:
    """The unperturbed condition first, then each distinct perturbed one once."""
    out = [Condition()]
    for c in [Condition(noise=s) for s in noise_levels] + [Condition(dropout=p) for p in dropout_levels]:
        if c not in out:
            out.append(c)
    return out


def stress_test(
    net: torch.nn.Module,
    clips: Sequence[ClipFiles],
    noise_levels: Sequence[float],
    dropout_levels: Sequence[float],
    *,
    seed: int = 0,
    y_channel: bool = False,
    chunk: int = 100,
    chunk_overlap: int = 2,
    tile: int = 0,
    tile_overlap: int = 50,
    device: Optional[torch.device] = None,
    log: Optional[Callable[[str], None]] = None,
) -> StressResult:
    """Evaluate ``net`` (a GSMNet in eval mode) on every clip under every condition of the two sweeps.

    Clips are loaded one at a time; every condition runs on a clip before the next is loaded. The unperturbed
    condition is always evaluated (it is the reference of both sweeps). ``net.flow_transform`` is restored.
    """
    from basicsr.utils import tensor2img

    from gsmsr.models.gsm_model import average_over_clips, score_frames
    from gsmsr.tiling import forward_chunked

    if not clips:
        raise InputError('no clips to evaluate')
    device = device or next(net.parameters()).device
    scale = int(net.upscale)
    metrics = {name: dict(type=f'calculate_{name}', crop_border=0, test_y_channel=y_channel) for name in METRIC_NAMES}
    conditions = conditions_of(noise_levels, dropout_levels)
    result = StressResult(list(noise_levels), list(dropout_levels), seed, y_channel)
    per_frame: Dict[Condition, Dict[str, np.ndarray]] = {c: {} for c in conditions}
    for clip in clips:
        lq, gts = load_clip(clip, scale, MIN_SIZE)
        lq = lq.unsqueeze(0).to(device)
        for c in conditions:
            perturbation = FlowPerturbation(c.noise, c.dropout, clip_seed(seed, clip.name))
            with perturbed_flows(net, perturbation), torch.no_grad():
                out = forward_chunked(net, lq, scale, chunk, chunk_overlap, tile, tile_overlap)[0].cpu()
            per_frame[c][clip.name] = score_frames([tensor2img(frame) for frame in out], gts, metrics)
            del out
            if log:
                psnr, ssim = per_frame[c][clip.name].mean(axis=0)
                log(
                    f'clip {clip.name}: noise {c.noise:g} px, dropout {c.dropout:g}: '
                    f'PSNR {psnr:.4f} dB, SSIM {ssim:.4f}'
                )
        result.clips.append(clip.name)
        result.frames += len(clip.frames)
        del lq, gts
    for c in conditions:
        result.per_clip[c], result.overall[c] = average_over_clips(per_frame[c])
    return result


# ----------------------------------------------------------------------------------------------- report
def format_table(result: StressResult, title: str = '') -> str:
    """The report table: one line per (sweep, level) with PSNR/SSIM and their change from the clean network."""
    channel = 'Y' if result.y_channel else 'RGB'
    clean = result.clean
    lines = [title] if title else []
    lines.append(
        f'{len(result.clips)} clip(s), {result.frames} frames, metrics on {channel}, crop 0, '
        f'seed {result.seed}; clean PSNR {clean[0]:.4f} dB, SSIM {clean[1]:.4f}'
    )
    lines.append(f'{"perturbation":<22}{"level":>8}{"PSNR":>11}{"dPSNR":>10}{"SSIM":>9}{"dSSIM":>10}')
    for sweep, level, c in result.rows():
        v = result.overall[c]
        lines.append(
            f'{SWEEP_LABELS[sweep]:<22}{level:>8g}{v[0]:>11.4f}{v[0] - clean[0]:>+10.4f}'
            f'{v[1]:>9.4f}{v[1] - clean[1]:>+10.4f}'
        )
    return '\n'.join(lines) + '\n'


def format_csv(result: StressResult) -> str:
    clean = result.clean
    lines = ['sweep,level,noise_std_px,dropout_prob,psnr,ssim,delta_psnr,delta_ssim']
    for sweep, level, c in result.rows():
        v = result.overall[c]
        values = [level, c.noise, c.dropout, v[0], v[1], v[0] - clean[0], v[1] - clean[1]]
        lines.append(','.join([sweep] + [repr(float(x)) for x in values]))  # repr: round-trips exactly
    return '\n'.join(lines) + '\n'


def _ticks(lo: float, hi: float, count: int = 5) -> Tuple[List[float], int]:
    """``count`` evenly spaced ticks over [lo, hi] and the decimals that tell them apart."""
    step = (hi - lo) / (count - 1)
    decimals = max(0, min(8, 1 - math.floor(math.log10(step)))) if step > 0 else 2
    return [lo + i * step for i in range(count)], decimals


def _draw_panel(
    img: np.ndarray,
    x0: int,
    y0: int,
    w: int,
    h: int,
    xs: Sequence[float],
    ys: Sequence[float],
    ref: float,
    title: str,
    xlabel: str,
    ylabel: str,
    color: Tuple[int, int, int],
) -> None:
    """Line plot of ys over xs in the box (x0, y0, w, h) of ``img``, with a dashed line at ``ref``."""
    font, black, grey = cv2.FONT_HERSHEY_SIMPLEX, (0, 0, 0), (170, 170, 170)
    left, right, top, bottom = x0 + 80, x0 + w - 25, y0 + 40, y0 + h - 45
    lo, hi = min(min(ys), ref), max(max(ys), ref)
    pad = 0.08 * (hi - lo) if hi > lo else max(abs(hi) * 1e-3, 1e-3)
    lo, hi = lo - pad, hi + pad
    xlo, xhi = min(xs), max(xs)
    if xhi == xlo:
        xlo, xhi = xlo - 0.5, xhi + 0.5

    def px(x: float, y: float) -> Tuple[int, int]:
        return (
            int(round(left + (x - xlo) / (xhi - xlo) * (right - left))),
            int(round(bottom - (y - lo) / (hi - lo) * (bottom - top))),
        )

    (tw, _), _ = cv2.getTextSize(title, font, 0.5, 1)
    cv2.putText(img, title, (x0 + (w - tw) // 2, y0 + 18), font, 0.5, black, 1, cv2.LINE_AA)
    cv2.putText(img, ylabel, (x0 + 5, top - 8), font, 0.4, black, 1, cv2.LINE_AA)
    (tw, _), _ = cv2.getTextSize(xlabel, font, 0.4, 1)
    cv2.putText(img, xlabel, ((left + right - tw) // 2, y0 + h - 8), font, 0.4, black, 1, cv2.LINE_AA)
    ticks, decimals = _ticks(lo, hi)
    for t in ticks:
        _, y = px(xlo, t)
        cv2.line(img, (left, y), (right, y), (235, 235, 235), 1)
        cv2.line(img, (left - 4, y), (left, y), black, 1)
        label = f'{t:.{decimals}f}'
        (tw, th), _ = cv2.getTextSize(label, font, 0.35, 1)
        cv2.putText(img, label, (left - 7 - tw, y + th // 2), font, 0.35, black, 1, cv2.LINE_AA)
    for x in xs:
        xp, _ = px(x, lo)
        cv2.line(img, (xp, bottom), (xp, bottom + 4), black, 1)
        label = f'{x:g}'
        (tw, th), _ = cv2.getTextSize(label, font, 0.35, 1)
        cv2.putText(img, label, (xp - tw // 2, bottom + 8 + th), font, 0.35, black, 1, cv2.LINE_AA)
    cv2.rectangle(img, (left, top), (right, bottom), black, 1)
    _, yr = px(xlo, ref)
    for xd in range(left, right, 12):  # dashed: the clean network
        cv2.line(img, (xd, yr), (min(xd + 6, right), yr), grey, 1, cv2.LINE_AA)
    points = [px(x, y) for x, y in sorted(zip(xs, ys))]
    for a, b in zip(points, points[1:]):
        cv2.line(img, a, b, color, 2, cv2.LINE_AA)
    for p in points:
        cv2.circle(img, p, 4, color, -1, cv2.LINE_AA)


def plot_curves(result: StressResult, panel: Tuple[int, int] = (440, 300)) -> np.ndarray:
    """BGR uint8 image: PSNR (top row) and SSIM (bottom row) against each sweep's level (one column each)."""
    sweeps = [
        (s, levels) for s, levels in (('noise', result.noise_levels), ('dropout', result.dropout_levels)) if levels
    ]
    pw, ph = panel
    img = np.full((2 * ph, max(1, len(sweeps)) * pw, 3), 255, np.uint8)
    colors = {'noise': (180, 90, 20), 'dropout': (30, 100, 220)}
    for col, (sweep, levels) in enumerate(sweeps):
        conds = [Condition(noise=v) if sweep == 'noise' else Condition(dropout=v) for v in levels]
        for row, (m, name, unit) in enumerate(((0, 'PSNR', 'PSNR (dB)'), (1, 'SSIM', 'SSIM'))):
            ys = [float(result.overall[c][m]) for c in conds]
            _draw_panel(
                img,
                col * pw,
                row * ph,
                pw,
                ph,
                levels,
                ys,
                float(result.clean[m]),
                f'{name} vs flow {sweep} (dashed: clean)',
                SWEEP_LABELS[sweep],
                unit,
                colors[sweep],
            )
    return img


def write_report(result: StressResult, out_dir: str, title: str = '') -> Dict[str, str]:
    """Write the table, CSV and plot into ``out_dir`` (each atomically); returns kind -> path."""
    os.makedirs(out_dir, exist_ok=True)
    ok, png = cv2.imencode('.png', plot_curves(result))
    if not ok:
        raise OSError('cannot encode the plot as PNG')
    paths = {kind: os.path.join(out_dir, name) for kind, name in REPORT_NAMES.items()}
    atomic_write_bytes(paths['plot'], png.tobytes())
    atomic_write_bytes(paths['csv'], format_csv(result).encode('utf-8'))
    atomic_write_bytes(paths['table'], format_table(result, title).encode('utf-8'))
    return paths


# ----------------------------------------------------------------------------------------------- CLI
def parse_levels(text: str, flag: str, upper: float = math.inf) -> List[float]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0] (sorted, duplicates removed); '' -> [] (sweep skipped)."""
    levels = set()
    for part in (p.strip() for p in text.split(',')):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise InputError(f'{flag} {text!r}: {part!r} is not a number') from None
        if not (math.isfinite(value) and 0 <= value <= upper):
            raise InputError(f'{flag} {text!r}: {part} is outside [0, {upper:g}]')
        levels.add(value)
    return sorted(levels)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        '--weights',
        help='checkpoint: BasicSR (params_ema preferred, then params) or official '
        '(default: path.pretrain_network_g of -opt)',
    )
    parser.add_argument(
        '-opt',
        '--opt',
        help='BasicSR options YAML whose network_g (type GSMNet) is used (default: the released x4 model)',
    )
    parser.add_argument('--gt', required=True, help='GT folder, REDS layout: DIR/<clip>/<frame>.png')
    parser.add_argument('--lq', required=True, help='LR folder, same layout and frame names as --gt')
    parser.add_argument('--out', required=True, help='output folder for stress_flow.{txt,csv,png}')
    parser.add_argument(
        '--noise',
        default='0,0.5,1,2,4',
        help='Gaussian flow noise std in LR pixels, comma-separated; "" skips the sweep (default: %(default)s)',
    )
    parser.add_argument(
        '--dropout',
        default='0,0.1,0.3,0.5',
        help='probability of zeroing each flow vector (pixel-wise), comma-separated; "" skips '
        'the sweep (default: %(default)s)',
    )
    parser.add_argument('--seed', type=int, default=0, help='seed of the perturbations (default: %(default)s)')
    parser.add_argument('--max-frames', type=int, default=0, help='first N frames of each clip, 0 = all')
    parser.add_argument('--y', action='store_true', help='PSNR/SSIM on the Y channel (default: RGB)')
    parser.add_argument(
        '--chunk',
        type=int,
        default=100,
        help='frames per temporal chunk, 0 = whole clip (default: %(default)s, the test protocol)',
    )
    parser.add_argument('--chunk-overlap', type=int, default=2, help='(default: %(default)s)')
    parser.add_argument('--tile', type=int, default=0, help='LR tile side, 0 = whole frame (default)')
    parser.add_argument('--tile-overlap', type=int, default=50, help='(default: %(default)s)')
    parser.add_argument('--device', help='torch device (default: cuda if available, else cpu)')


def _check_protocol(chunk: int, chunk_overlap: int, tile: int, tile_overlap: int, min_size: int) -> None:
    if chunk < 0 or chunk == 1:
        raise InputError(f'--chunk {chunk}: must be 0 (whole clip) or at least 2')
    if chunk_overlap < 0 or (chunk and chunk_overlap >= chunk):
        raise InputError(f'--chunk-overlap {chunk_overlap}: must be >= 0 and smaller than --chunk {chunk}')
    if tile < 0 or 0 < tile < min_size:
        raise InputError(f'--tile {tile}: must be 0 (whole frame) or at least {min_size}')
    if tile_overlap < 0 or (tile and tile_overlap >= tile):
        raise InputError(f'--tile-overlap {tile_overlap}: must be >= 0 and smaller than --tile {tile}')


def run(args: argparse.Namespace) -> int:
    """Exit codes: 0 done, 2 bad input or arguments, 1 unexpected failure."""
    return run_reporting_errors(
        'gsmsr stress-flow', lambda: _run(args), 'interrupted, no report written', debug=getattr(args, 'debug', False)
    )


def _run(args: argparse.Namespace) -> int:
    prog = 'gsmsr stress-flow'
    noise = parse_levels(args.noise, '--noise')
    dropout = parse_levels(args.dropout, '--dropout', upper=1.0)
    if not noise and not dropout:
        raise InputError('--noise and --dropout are both empty: nothing to sweep')
    _check_protocol(args.chunk, args.chunk_overlap, args.tile, args.tile_overlap, MIN_SIZE)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise InputError(f'--out {args.out}: exists and is not a directory')
    clips = find_clips(args.gt, args.lq, args.max_frames)
    device = resolve_device(args.device)
    net = load_network(args.weights, args.opt, device)
    if not isinstance(net, GSMNet):
        raise InputError(f'network_g type {type(net).__name__}: stress-flow needs GSMNet (flow_transform hook)')
    weights = args.weights or f'path.pretrain_network_g of {args.opt}'
    result = stress_test(
        net,
        clips,
        noise,
        dropout,
        seed=args.seed,
        y_channel=args.y,
        chunk=args.chunk,
        chunk_overlap=args.chunk_overlap,
        tile=args.tile,
        tile_overlap=args.tile_overlap,
        device=device,
        log=lambda line: print(f'{prog}: {line}', file=sys.stderr),
    )
    title = f'Flow stress test of {weights}'
    paths = write_report(result, args.out, title)
    print(format_table(result, title), end='')
    print(f'{prog}: wrote {paths["table"]}, {paths["csv"]}, {paths["plot"]}', file=sys.stderr)
    return 0
