"""Shared fixtures: tiny clips in REDS and Vimeo-90K layouts (disk and LMDB) and option-file builders.

The clips are smooth random textures moving a few pixels per frame; LR = area-downscaled GT (x4). Sizes are the
smallest GSMNet accepts (LR 36x36 >= 33), so a training step of the tiny network takes about a second.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional

import cv2
import numpy as np
import pytest
import torch
import yaml

import gsmsr  # noqa: F401  (compat before BasicSR)

SCALE = 4
LR_SIZE = 36
GT_SIZE = SCALE * LR_SIZE
TINY_NET = dict(
    type='GSMNet', upscale=SCALE, prop_depth=1, attn_depth=1, pa_frame=1, embed_dims=16, num_heads=4, spynet_path=None
)
REPO_ROOT = Path(__file__).resolve().parents[1]

# pytest-xdist (``-n auto`` in pytest.ini): each worker computes with one thread, and so do the processes its tests
# start (OMP_NUM_THREADS). Two workers of two threads each on two cores are far slower than one thread each: an
# OpenMP thread that waits for a core holds up every parallel op of its process (a tiny GSMNet forward took 5x
# longer with two threads while another process kept one core busy).
if os.environ.get('PYTEST_XDIST_WORKER'):
    torch.set_num_threads(1)
    os.environ['OMP_NUM_THREADS'] = '1'


def pytest_xdist_auto_num_workers(config) -> Optional[int]:
    """Workers for ``-n auto``: none (one process, as without xdist) on a machine with CUDA, whose tests share the
    GPU and print timings, or with ``-s``, whose output workers would swallow; else xdist's default, one a CPU core
    (``PYTEST_XDIST_AUTO_NUM_WORKERS`` sets the number). ``-n 0`` or ``-n N`` on the command line decide instead."""
    if os.environ.get('PYTEST_XDIST_AUTO_NUM_WORKERS'):
        return None
    if config.option.capture == 'no' or torch.cuda.is_available():
        return 0
    return None


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth random BGR texture, float in [0, 1], (h, w, 3)."""
    noise = rng.random((h // 8 + 2, w // 8 + 2, 3)).astype(np.float32)
    return cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 1)


def write_clip(gt_dir: Path, lq_dir: Path, names: List[str], rng: np.random.Generator) -> None:
    """Frames ``names`` (file stems) of one moving-texture clip, GT (144x144) and LR (36x36) PNGs."""
    gt_dir.mkdir(parents=True, exist_ok=True)
    lq_dir.mkdir(parents=True, exist_ok=True)
    base = _texture(rng, GT_SIZE + 64, GT_SIZE + 64)
    for t, name in enumerate(names):
        dy, dx = (2 * t) % 64, (3 * t) % 64
        gt = np.round(base[dy : dy + GT_SIZE, dx : dx + GT_SIZE] * 255).astype(np.uint8)
        lq = cv2.resize(gt, (LR_SIZE, LR_SIZE), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(gt_dir / f'{name}.png'), gt)
        cv2.imwrite(str(lq_dir / f'{name}.png'), lq)


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory) -> Dict[str, Path]:
    """REDS layout (train clips 001/002 of 100 frames, REDS4 clip 000 of 3 frames) and Vimeo-90K layout
    (train 00001/0001, 00001/0002; test 00002/0001), plus their LMDBs built by ``gsmsr make-lmdb``."""
    from gsmsr.data import make_lmdb

    root = tmp_path_factory.mktemp('data')
    rng = np.random.default_rng(0)
    reds = root / 'REDS'
    for clip, frames in (('000', 3), ('001', 100), ('002', 100)):
        write_clip(
            reds / 'train_sharp' / clip,
            reds / 'train_sharp_bicubic' / 'X4' / clip,
            [f'{i:08d}' for i in range(frames)],
            rng,
        )
    (reds / 'meta_train.txt').write_text(f'001 100 ({GT_SIZE},{GT_SIZE},3)\n002 100 ({GT_SIZE},{GT_SIZE},3)\n')
    (reds / 'meta_reds4.txt').write_text(f'000 3 ({GT_SIZE},{GT_SIZE},3)\n')

    vimeo = root / 'vimeo90k'
    for seq in ('00001/0001', '00001/0002', '00002/0001'):
        write_clip(
            vimeo / 'vimeo_septuplet' / 'sequences' / seq,
            vimeo / 'vimeo_septuplet_matlabLRx4' / 'sequences' / seq,
            [f'im{k}' for k in range(1, 8)],
            rng,
        )
    (vimeo / 'vimeo_septuplet' / 'sep_trainlist.txt').write_text('00001/0001\n00001/0002\n')
    (vimeo / 'vimeo_septuplet' / 'sep_testlist.txt').write_text('00002/0001\n')

    assert make_lmdb.main(['reds', '--root', str(reds), '--workers', '2']) == 0
    assert make_lmdb.main(['vimeo', '--root', str(vimeo), '--workers', '2']) == 0
    return {'root': root, 'reds': reds, 'vimeo': vimeo}


def train_options(data: Dict[str, Path], name: str, layout: str, backend: str, **overrides: Any) -> Dict[str, Any]:
    """Options of a tiny training run: 2 iterations, validation and checkpoint at iteration 2."""
    if layout == 'reds':
        reds = data['reds']
        lmdb = backend == 'lmdb'
        lq_root = 'train_sharp_bicubic_with_val.lmdb' if lmdb else 'train_sharp_bicubic/X4'
        train = dict(
            name='REDS',
            type='REDSRecurrentDataset',
            dataroot_gt=str(reds / ('train_sharp_with_val.lmdb' if lmdb else 'train_sharp')),
            dataroot_lq=str(reds / lq_root),
            meta_info_file=str(reds / 'meta_train.txt'),
            val_partition='REDS4',
            test_mode=False,
            io_backend=dict(type=backend),
            num_frame=2,
            gt_size=GT_SIZE,
            interval_list=[1],
            random_reverse=False,
            use_hflip=True,
            use_rot=True,
        )
        val = dict(
            name='REDS4',
            type='VideoRecurrentTestDataset',
            dataroot_gt=str(reds / 'train_sharp'),
            dataroot_lq=str(reds / 'train_sharp_bicubic/X4'),
            meta_info_file=str(reds / 'meta_reds4.txt'),
            cache_data=True,
            io_backend=dict(type='disk'),
            num_frame=-1,
        )
        val_opt: Dict[str, Any] = {}
    else:
        vimeo = data['vimeo']
        lmdb = backend == 'lmdb'
        train = dict(
            name='Vimeo90K',
            type='Vimeo90KRecurrentDataset',
            dataroot_gt=str(vimeo / ('vimeo90k_train_GT_all.lmdb' if lmdb else 'vimeo_septuplet/sequences')),
            dataroot_lq=str(
                vimeo / ('vimeo90k_train_LR7frames.lmdb' if lmdb else 'vimeo_septuplet_matlabLRx4/sequences')
            ),
            meta_info_file=str(vimeo / 'meta_info_Vimeo90K_train_GT.txt'),
            io_backend=dict(type=backend),
            num_frame=7,
            gt_size=GT_SIZE,
            random_reverse=False,
            use_hflip=True,
            use_rot=True,
            flip_sequence=False,
        )
        val = dict(
            name='Vimeo90K-T',
            type='VideoTestVimeo90KDataset',
            dataroot_gt=str(vimeo / 'vimeo_septuplet/sequences'),
            dataroot_lq=str(vimeo / 'vimeo_septuplet_matlabLRx4/sequences'),
            meta_info_file=str(vimeo / 'meta_info_Vimeo90K_test_GT.txt'),
            cache_data=False,
            io_backend=dict(type='disk'),
            num_frame=7,
        )
        val_opt = dict(center_frame_only=True)
    train.update(num_worker_per_gpu=0, batch_size_per_gpu=1, dataset_enlarge_ratio=1, prefetch_mode=None)
    opt = dict(
        name=name,
        model_type='GSMModel',
        scale=SCALE,
        num_gpu=0,
        manual_seed=0,
        datasets=dict(train=train, val=val),
        network_g=dict(TINY_NET),
        path=dict(pretrain_network_g=None, strict_load_g=True, resume_state=None),
        train=dict(
            ema_decay=0.9,
            optim_g=dict(type='Adam', lr=2e-4, weight_decay=0, betas=[0.9, 0.99]),
            scheduler=dict(type='CosineAnnealingRestartLR', periods=[4], restart_weights=[1], eta_min=1e-7),
            total_iter=2,
            warmup_iter=-1,
            fix_flow=2,
            flow_lr_mul=0.125,
            pixel_opt=dict(type='CharbonnierLoss', loss_weight=1.0, reduction='mean', eps=1e-12),
        ),
        val=dict(
            val_freq=2,
            save_img=False,
            chunk=0,
            tile=0,
            metrics=dict(
                psnr=dict(type='calculate_psnr', crop_border=0, test_y_channel=False),
                ssim=dict(type='calculate_ssim', crop_border=0, test_y_channel=False),
            ),
            **val_opt,
        ),
        logger=dict(print_freq=1, save_checkpoint_freq=2, use_tb_logger=False, wandb=dict(project=None)),
    )
    return _merge(opt, overrides)


def make_opt(
    tmp_path: Path, is_train: bool = True, train: Optional[Dict[str, Any]] = None, val: Optional[Dict[str, Any]] = None
) -> Dict[str, Any]:
    """Parsed options (as BasicSR's parse_options leaves them) for building a GSMModel directly."""
    train_opt = dict(
        ema_decay=0.5,
        optim_g=dict(type='Adam', lr=1e-3, weight_decay=0, betas=[0.9, 0.99]),
        scheduler=dict(type='CosineAnnealingRestartLR', periods=[10], restart_weights=[1], eta_min=1e-7),
        total_iter=10,
        warmup_iter=-1,
        fix_flow=2,
        flow_lr_mul=0.125,
        pixel_opt=dict(type='CharbonnierLoss', loss_weight=1.0, reduction='mean', eps=1e-12),
    )
    train_opt.update(train or {})
    opt = dict(
        name='unit',
        model_type='GSMModel',
        scale=4,
        num_gpu=0,
        is_train=is_train,
        dist=False,
        rank=0,
        world_size=1,
        network_g=dict(TINY_NET),
        path=dict(
            pretrain_network_g=None,
            strict_load_g=True,
            param_key_g='params',
            models=str(tmp_path / 'models'),
            training_states=str(tmp_path / 'training_states'),
            visualization=str(tmp_path / 'visualization'),
            results_root=str(tmp_path),
        ),
        val=dict(chunk=0, tile=0, **(val or {})),
    )
    if is_train:
        opt['train'] = train_opt
    return opt


def _merge(base: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def write_options(path: Path, opt: Dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(opt, sort_keys=False))
    return path


@pytest.fixture
def in_tmp_cwd(tmp_path, monkeypatch) -> Path:
    """Run in a fresh working directory (experiments/ and results/ land there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def read_log(folder: Path, prefix: str) -> str:
    logs = sorted(folder.glob(f'{prefix}_*.log'))
    assert logs, f'no {prefix}_*.log in {folder}: {os.listdir(folder)}'
    return logs[-1].read_text()


@pytest.fixture(autouse=True)
def _no_tf32_on_gpu_tests(request):
    """GPU tests compare in full fp32: TF32 matmuls (about 1e-3 relative) would hide real differences."""
    if request.node.get_closest_marker('gpu') is None:
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture
def windows_and_merged() -> Callable[[], ContextManager[List[torch.Tensor]]]:
    """A context manager that records, block by block, the windows ``SWSABlock.attention_windows`` returns and the
    attended windows ``SWSABlock.attention_merge`` receives (the class's own methods again on exit, before anything
    compiles them)."""
    from gsmsr.archs.swsa import SWSABlock

    @contextlib.contextmanager
    def record() -> Iterator[List[torch.Tensor]]:
        held: List[torch.Tensor] = []
        windows, merge = SWSABlock.attention_windows, SWSABlock.attention_merge
        with pytest.MonkeyPatch.context() as m:
            m.setattr(SWSABlock, 'attention_windows', lambda self, x: held.append(windows(self, x)) or held[-1])
            m.setattr(SWSABlock, 'attention_merge', lambda self, x, o, *to: held.append(o) or merge(self, x, o, *to))
            yield held

    return record
