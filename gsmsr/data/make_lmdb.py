"""``gsmsr make-lmdb``: LMDBs and meta-info files for REDS and Vimeo-90K in BasicSR's layout.

Subcommands::

    gsmsr make-lmdb reds  --root datasets/REDS
        reads   train_sharp/<clip>/<frame>.png and train_sharp_bicubic/X4/<clip>/<frame>.png, plus, when present,
                val_sharp/ and val_sharp_bicubic/X4/, whose clips 000-029 become 240-269 (BasicSR's
                "train_sharp_with_val" regrouping, 270 clips in all);
        writes  train_sharp_with_val.lmdb, train_sharp_bicubic_with_val.lmdb (keys '000/00000000').
    gsmsr make-lmdb vimeo --root datasets/vimeo90k
        reads   vimeo_septuplet/sequences/<clip>/<seq>/im1..im7.png, vimeo_septuplet_matlabLRx4/sequences/...,
                and the official list vimeo_septuplet/sep_trainlist.txt (64,612 lines '00001/0001');
        writes  vimeo90k_train_GT_all.lmdb, vimeo90k_train_LR7frames.lmdb (keys '00001/0001/im1'), and
                meta_info_Vimeo90K_train_GT.txt (+ meta_info_Vimeo90K_test_GT.txt from sep_testlist.txt).
    gsmsr make-lmdb vimeo-meta --list sep_testlist.txt --out meta_info_Vimeo90K_test_GT.txt
        only the meta-info file, from the official list (for the disk backend and for testing).
    gsmsr make-lmdb reds-meta --out DIR
        the REDS meta-info files shipped in gsmsr/data/meta_info/ (REDS train without REDS4, and REDS4).

Every LMDB (with BasicSR's ``meta_info.txt`` inside) and meta-info file is built under a temporary name and
renamed when complete; an existing output is never overwritten. Images are re-encoded as PNG
(``--compress-level``, BasicSR's default 1) by a thread pool (``--workers``).

``gsmsr make-lmdb`` reports failures in one line (:mod:`gsmsr.faults`): exit 2 for a bad dataset layout or an
existing output, 1 for the environment (full disk, read or write errors), 128 + signal number when
interrupted; ``--debug`` adds the traceback. :func:`main` is the Python entry and raises instead.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from os import path as osp
from typing import Iterable, List, Optional, Sequence, Tuple

import cv2

from gsmsr.faults import FaultError, InputError, add_debug_argument, run_reporting_errors
from gsmsr.utils import atomic_write_text

META_INFO_DIR = osp.join(osp.dirname(osp.abspath(__file__)), 'meta_info')
REDS4_CLIPS = ('000', '011', '015', '020')
REDS_NUM_CLIPS = 270  # 240 train_sharp clips + 30 val_sharp clips renumbered 240-269
REDS_NUM_TRAIN_SHARP = 240
REDS_FRAMES = 100
REDS_GT_SHAPE = (720, 1280, 3)
VIMEO_GT_SHAPE = (256, 448, 3)
REDS_TRAIN_META = 'meta_info_REDS_train_GT.txt'
REDS4_TEST_META = 'meta_info_REDS4_test_GT.txt'
_VIMEO_ENTRY = re.compile(r'^\d{5}/\d{4}$')


# ----------------------------------------------------------------------------------------------------------
# meta-info files (BasicSR's format: '<clip> <num frames> (<h>,<w>,<c>)')
# ----------------------------------------------------------------------------------------------------------
def _shape_str(shape: Sequence[int]) -> str:
    return '(' + ','.join(str(int(v)) for v in shape) + ')'


def reds_meta_lines(split: str) -> List[str]:
    """``'train'``: the 266 training clips (000-269 without REDS4); ``'reds4'``: the 4 REDS4 test clips."""
    clips = [f'{i:03d}' for i in range(REDS_NUM_CLIPS)]
    if split == 'train':
        clips = [c for c in clips if c not in REDS4_CLIPS]
    elif split == 'reds4':
        clips = list(REDS4_CLIPS)
    else:
        raise ValueError(f"split must be 'train' or 'reds4', got {split!r}")
    return [f'{c} {REDS_FRAMES} {_shape_str(REDS_GT_SHAPE)}' for c in clips]


def vimeo_meta_lines(list_file: str, shape: Sequence[int] = VIMEO_GT_SHAPE) -> List[str]:
    """Meta-info lines ``'00001/0001 7 (256,448,3)'`` from an official ``sep_trainlist.txt`` / ``sep_testlist.txt``."""
    lines = []
    with open(list_file, encoding='utf-8') as f:
        for number, raw in enumerate(f, 1):
            entry = raw.strip()
            if not entry:
                continue
            if not _VIMEO_ENTRY.match(entry):
                raise ValueError(f'{list_file}:{number}: expected an entry like 00001/0001, got {entry!r}')
            lines.append(f'{entry} 7 {_shape_str(shape)}')
    if not lines:
        raise ValueError(f'{list_file}: no septuplet entries')
    return lines


def write_lines(path: str, lines: Iterable[str], overwrite: bool = False) -> None:
    """Write text lines atomically; refuse to replace an existing file unless ``overwrite``."""
    if osp.exists(path) and not overwrite:
        raise FileExistsError(f'{path} already exists')
    atomic_write_text(path, ''.join(f'{line}\n' for line in lines))  # a failed write leaves no temporary file


def write_reds_meta(out_dir: str, overwrite: bool = False) -> List[str]:
    paths = [osp.join(out_dir, REDS_TRAIN_META), osp.join(out_dir, REDS4_TEST_META)]
    write_lines(paths[0], reds_meta_lines('train'), overwrite)
    write_lines(paths[1], reds_meta_lines('reds4'), overwrite)
    return paths


# ----------------------------------------------------------------------------------------------------------
# LMDB
# ----------------------------------------------------------------------------------------------------------
def _encode(path: str, compress_level: int) -> Tuple[bytes, Tuple[int, int, int]]:
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f'cannot read image {path}')
    ok, buf = cv2.imencode('.png', img, [cv2.IMWRITE_PNG_COMPRESSION, compress_level])
    if not ok:
        raise ValueError(f'cannot encode image {path}')
    h, w = img.shape[:2]
    return buf.tobytes(), (h, w, 1 if img.ndim == 2 else img.shape[2])


def build_lmdb(
    lmdb_path: str, items: Sequence[Tuple[str, str]], workers: int = 8, compress_level: int = 1, batch: int = 1000
) -> None:
    """BasicSR LMDB (``data.mdb`` + ``meta_info.txt``) from ``items`` = [(image path, key)], atomically.

    Built as a hidden ``*.partial.lmdb`` next to the target, renamed on success, removed on failure.
    """
    import lmdb
    from basicsr.utils.lmdb_util import LmdbMaker

    if not lmdb_path.endswith('.lmdb'):
        raise ValueError(f"LMDB path must end with '.lmdb': {lmdb_path}")
    if osp.exists(lmdb_path):
        raise FileExistsError(f'{lmdb_path} already exists; remove it to rebuild')
    if not items:
        raise ValueError(f'no images for {lmdb_path}')
    folder, name = osp.split(osp.abspath(lmdb_path))
    os.makedirs(folder, exist_ok=True)
    tmp = osp.join(folder, f'.{name[: -len(".lmdb")]}.partial.lmdb')
    if osp.exists(tmp):
        shutil.rmtree(tmp)  # left over from an interrupted run
    print(f'Writing {len(items)} images to {lmdb_path} ...', flush=True)
    try:
        maker = LmdbMaker(tmp, batch=batch, compress_level=compress_level)
        try:
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                for start in range(0, len(items), batch):  # bounded memory: one batch in flight
                    chunk = items[start : start + batch]
                    encoded = pool.map(lambda item: _encode(item[0], compress_level), chunk)
                    for (_, key), (data, shape) in zip(chunk, encoded):
                        maker.put(data, key, shape)
        except lmdb.Error as e:  # a full disk is an lmdb.Error naming neither the file nor an errno
            raise FaultError(f'{lmdb_path}: cannot write LMDB ({e})') from e
        finally:
            maker.close()
        os.replace(tmp, lmdb_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _frames(folder: str) -> List[str]:
    return sorted(f for f in os.listdir(folder) if f.lower().endswith('.png'))


def _require_dir(path: str, what: str) -> str:
    if not osp.isdir(path):
        raise FileNotFoundError(f'{what} not found: {path}')
    return path


def reds_items(root: str) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str]]]:
    """(GT items, LQ items) of REDS ``train_sharp`` (+ ``val_sharp`` as clips 240-269), keys 'clip/frame'."""
    sources = [
        (
            _require_dir(osp.join(root, 'train_sharp'), 'REDS GT folder'),
            _require_dir(osp.join(root, 'train_sharp_bicubic', 'X4'), 'REDS LR folder'),
            0,
        )
    ]
    val_gt, val_lq = osp.join(root, 'val_sharp'), osp.join(root, 'val_sharp_bicubic', 'X4')
    if osp.isdir(val_gt) or osp.isdir(val_lq):
        sources.append(
            (
                _require_dir(val_gt, 'REDS val GT folder'),
                _require_dir(val_lq, 'REDS val LR folder'),
                REDS_NUM_TRAIN_SHARP,
            )
        )
    gt_items, lq_items, seen = [], [], {}
    for gt_root, lq_root, offset in sources:
        for clip in sorted(os.listdir(gt_root)):
            if not osp.isdir(osp.join(gt_root, clip)):
                continue
            if not clip.isdigit():
                raise ValueError(f'unexpected REDS clip folder {osp.join(gt_root, clip)} (expected e.g. 000)')
            key_clip = f'{int(clip) + offset:03d}'
            if key_clip in seen:
                raise ValueError(
                    f'clip {key_clip} appears twice: {seen[key_clip]} and {osp.join(gt_root, clip)} '
                    '(train_sharp already regrouped with val_sharp?)'
                )
            seen[key_clip] = osp.join(gt_root, clip)
            lq_clip = _require_dir(osp.join(lq_root, clip), f'LR frames of clip {clip}')
            gt_frames, lq_frames = _frames(osp.join(gt_root, clip)), _frames(lq_clip)
            if gt_frames != lq_frames:
                raise ValueError(
                    f'clip {clip}: GT ({len(gt_frames)} frames in {osp.join(gt_root, clip)}) and LR '
                    f'({len(lq_frames)} frames in {lq_clip}) frame names differ'
                )
            for frame in gt_frames:
                key = f'{key_clip}/{osp.splitext(frame)[0]}'
                gt_items.append((osp.join(gt_root, clip, frame), key))
                lq_items.append((osp.join(lq_clip, frame), key))
    if not gt_items:
        raise ValueError(f'no REDS frames under {root}')
    return gt_items, lq_items


def vimeo_items(gt_root: str, lq_root: str, list_file: str) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str]]]:
    """(GT items, LQ items) of all 7 frames of every septuplet in ``list_file``, keys '00001/0001/im1'."""
    gt_items, lq_items = [], []
    for line in vimeo_meta_lines(list_file):
        seq = line.split(' ')[0]
        for k in range(1, 8):
            gt_path, lq_path = osp.join(gt_root, seq, f'im{k}.png'), osp.join(lq_root, seq, f'im{k}.png')
            for p in (gt_path, lq_path):
                if not osp.isfile(p):
                    raise FileNotFoundError(f'{p} (listed as {seq} in {list_file}) does not exist')
            gt_items.append((gt_path, f'{seq}/im{k}'))
            lq_items.append((lq_path, f'{seq}/im{k}'))
    return gt_items, lq_items


# ----------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest='dataset', metavar='DATASET', required=True)
    reds = sub.add_parser('reds', help='REDS train_sharp (+ val_sharp) -> train_sharp_with_val*.lmdb')
    reds.add_argument('--root', required=True, help='REDS folder holding train_sharp/ and train_sharp_bicubic/X4/')
    vimeo = sub.add_parser('vimeo', help='Vimeo-90K septuplets -> vimeo90k_train_*.lmdb and meta-info files')
    vimeo.add_argument('--root', required=True, help='folder holding vimeo_septuplet/ and vimeo_septuplet_matlabLRx4/')
    vimeo.add_argument(
        '--trainlist', help='official sep_trainlist.txt (default: ROOT/vimeo_septuplet/sep_trainlist.txt)'
    )
    vimeo.add_argument(
        '--testlist', help='official sep_testlist.txt (default: ROOT/vimeo_septuplet/sep_testlist.txt if it exists)'
    )
    for p in (reds, vimeo):
        p.add_argument('--out', help='output folder (default: --root)')
        p.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1), help='reader threads')
        p.add_argument('--compress-level', type=int, default=1, help='PNG compression level in the LMDB (0-9)')
    meta = sub.add_parser('vimeo-meta', help='Vimeo-90K meta-info file from an official sep_*list.txt')
    meta.add_argument('--list', required=True, help='sep_trainlist.txt or sep_testlist.txt')
    meta.add_argument('--out', required=True, help='meta-info file to write')
    reds_meta = sub.add_parser('reds-meta', help='write the REDS meta-info files (as shipped in gsmsr)')
    reds_meta.add_argument('--out', required=True, help='output folder')
    for p in (reds, vimeo, meta, reds_meta):
        add_debug_argument(p)


def run(args: argparse.Namespace) -> int:
    """``gsmsr make-lmdb``: :func:`build` with one-line errors and exit codes (see the module docstring)."""

    def body() -> int:
        try:
            return build(args)
        except (ValueError, FileExistsError) as e:
            raise InputError(str(e)) from None
        except FileNotFoundError as e:
            if e.errno is not None:  # an OS error met while reading: the environment
                raise
            raise InputError(str(e)) from None  # a missing dataset part named by our own message

    return run_reporting_errors('gsmsr make-lmdb', body, 'interrupted, no LMDB written', getattr(args, 'debug', False))


def build(args: argparse.Namespace) -> int:
    """Write what ``args`` asks for; raises on failure."""
    if args.dataset == 'reds-meta':
        for path in write_reds_meta(args.out):
            print(f'wrote {path}')
        return 0
    if args.dataset == 'vimeo-meta':
        write_lines(args.out, vimeo_meta_lines(args.list))
        print(f'wrote {args.out}')
        return 0
    out = args.out or args.root
    if args.dataset == 'reds':
        gt_items, lq_items = reds_items(args.root)
        build_lmdb(osp.join(out, 'train_sharp_with_val.lmdb'), gt_items, args.workers, args.compress_level)
        build_lmdb(osp.join(out, 'train_sharp_bicubic_with_val.lmdb'), lq_items, args.workers, args.compress_level)
        return 0
    gt_root = _require_dir(osp.join(args.root, 'vimeo_septuplet', 'sequences'), 'Vimeo-90K GT folder')
    lq_root = _require_dir(osp.join(args.root, 'vimeo_septuplet_matlabLRx4', 'sequences'), 'Vimeo-90K LR folder')
    trainlist = args.trainlist or osp.join(args.root, 'vimeo_septuplet', 'sep_trainlist.txt')
    testlist = args.testlist or osp.join(args.root, 'vimeo_septuplet', 'sep_testlist.txt')
    if not osp.isfile(trainlist):
        raise FileNotFoundError(f'Vimeo-90K training list not found: {trainlist} (pass --trainlist)')
    gt_items, lq_items = vimeo_items(gt_root, lq_root, trainlist)
    build_lmdb(osp.join(out, 'vimeo90k_train_GT_all.lmdb'), gt_items, args.workers, args.compress_level)
    build_lmdb(osp.join(out, 'vimeo90k_train_LR7frames.lmdb'), lq_items, args.workers, args.compress_level)
    write_lines(osp.join(out, 'meta_info_Vimeo90K_train_GT.txt'), vimeo_meta_lines(trainlist))
    if args.testlist or osp.isfile(testlist):
        write_lines(osp.join(out, 'meta_info_Vimeo90K_test_GT.txt'), vimeo_meta_lines(testlist))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='gsmsr make-lmdb', description=__doc__.split('\n')[0])
    add_arguments(parser)
    return build(parser.parse_args(argv))


if __name__ == '__main__':
    _parser = argparse.ArgumentParser(prog='gsmsr make-lmdb', description=__doc__.split('\n')[0])
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
