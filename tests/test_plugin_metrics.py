"""Validation metrics: BasicSR's own functions, per-clip then over-clip averaging, Vimeo-90K-T centre frame."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from basicsr.data.video_test_dataset import VideoRecurrentTestDataset, VideoTestVimeo90KDataset
from basicsr.metrics import calculate_psnr, calculate_ssim
from basicsr.models import build_model
from basicsr.utils import tensor2img
from torch import nn
from torch.nn import functional as F

from conftest import make_opt, write_clip
from gsmsr.models.gsm_model import average_over_clips, score_frames

METRICS = {
    'psnr': dict(type='calculate_psnr', crop_border=0, test_y_channel=False),
    'ssim': dict(type='calculate_ssim', crop_border=0, test_y_channel=False),
    'psnr_y': dict(type='calculate_psnr', crop_border=2, test_y_channel=True),
    'ssim_y': dict(type='calculate_ssim', crop_border=2, test_y_channel=True),
}


def _psnr64(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def test_score_frames_equals_basicsr_functions():
    rng = np.random.default_rng(1)
    gts = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(3)]
    outs = [np.clip(g.astype(np.int16) + rng.integers(-9, 10, g.shape), 0, 255).astype(np.uint8) for g in gts]
    scores = score_frames(outs, gts, METRICS)
    assert scores.shape == (3, 4) and scores.dtype == np.float64
    for t, (o, g) in enumerate(zip(outs, gts)):
        assert scores[t, 0] == calculate_psnr(o, g, 0)
        assert scores[t, 0] == pytest.approx(_psnr64(o, g), abs=1e-10)
        assert scores[t, 1] == calculate_ssim(o, g, 0)
        assert scores[t, 2] == calculate_psnr(o, g, 2, test_y_channel=True)
        assert scores[t, 3] == calculate_ssim(o, g, 2, test_y_channel=True)


def test_average_per_clip_then_over_clips():
    per_frame = {'a': np.array([[30.0, 0.9], [32.0, 0.8], [34.0, 0.7]]), 'b': np.array([[20.0, 0.5], [22.0, 0.6]])}
    per_clip, overall = average_over_clips(per_frame)
    np.testing.assert_allclose(per_clip['a'], [32.0, 0.8])
    np.testing.assert_allclose(per_clip['b'], [21.0, 0.55])
    np.testing.assert_allclose(overall, [26.5, 0.675])  # not the frame average (27.6)


class Upsampler(nn.Module):
    """A known 'network': bicubic x4 per frame. (B, T, C, H, W) -> (B, T, C, 4H, 4W)."""

    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = lq.shape
        return F.interpolate(lq.flatten(0, 1), scale_factor=4, mode='bicubic', align_corners=False).view(
            b, t, c, 4 * h, 4 * w
        )


def _model_with_known_network(tmp_path, **val):
    model = build_model(make_opt(tmp_path, is_train=False, val=dict(metrics=METRICS, **val)))
    model.net_g = Upsampler()
    return model


def test_validation_scores_every_frame_per_clip(tmp_path):
    rng = np.random.default_rng(2)
    for clip, frames in (('a', 3), ('b', 2)):
        write_clip(tmp_path / 'gt' / clip, tmp_path / 'lq' / clip, [f'{i:04d}' for i in range(frames)], rng)
    dataset = VideoRecurrentTestDataset(
        dict(
            name='Vid4',
            dataroot_gt=str(tmp_path / 'gt'),
            dataroot_lq=str(tmp_path / 'lq'),
            cache_data=True,
            io_backend=dict(type='disk'),
            num_frame=-1,
        )
    )
    model = _model_with_known_network(tmp_path)
    results = model._validate(dataset, 'unit', None, save_img=True)

    expected = {}
    for clip, frames in (('a', 3), ('b', 2)):
        rows = []
        for i in range(frames):
            lq = cv2.imread(str(tmp_path / 'lq' / clip / f'{i:04d}.png'))[:, :, ::-1].astype(np.float32) / 255
            out = Upsampler()(torch.from_numpy(lq.copy()).permute(2, 0, 1)[None, None])[0, 0]
            out_img = tensor2img(out)
            gt_img = cv2.imread(str(tmp_path / 'gt' / clip / f'{i:04d}.png'))
            saved = cv2.imread(str(tmp_path / 'visualization' / 'Vid4' / clip / f'{i:08d}.png'))
            np.testing.assert_array_equal(saved, out_img)
            rows.append(
                [
                    calculate_psnr(out_img, gt_img, 0),
                    calculate_ssim(out_img, gt_img, 0),
                    calculate_psnr(out_img, gt_img, 2, test_y_channel=True),
                    calculate_ssim(out_img, gt_img, 2, test_y_channel=True),
                ]
            )
        expected[clip] = np.mean(rows, axis=0)
    for clip in ('a', 'b'):
        assert [results['clips'][clip][m] for m in METRICS] == pytest.approx(expected[clip].tolist(), abs=1e-9)
    overall = (expected['a'] + expected['b']) / 2
    assert [results['average'][m] for m in METRICS] == pytest.approx(overall.tolist(), abs=1e-9)
    assert results['num_frames'] == 5 and results['num_clips'] == 2
    written = json.loads((tmp_path / 'metrics_Vid4.json').read_text())
    assert written['average'] == pytest.approx(results['average'])


def test_vimeo90k_t_scores_only_the_centre_frame(tiny_data, tmp_path):
    vimeo = tiny_data['vimeo']
    opt = dict(
        name='Vimeo90K-T',
        dataroot_gt=str(vimeo / 'vimeo_septuplet/sequences'),
        dataroot_lq=str(vimeo / 'vimeo_septuplet_matlabLRx4/sequences'),
        meta_info_file=str(vimeo / 'meta_info_Vimeo90K_test_GT.txt'),
        cache_data=False,
        io_backend=dict(type='disk'),
        num_frame=7,
    )
    dataset = VideoTestVimeo90KDataset(dict(opt))
    model = _model_with_known_network(tmp_path, center_frame_only=True)
    results = model._validate(dataset, 'unit', None, save_img=True)

    seq = vimeo / 'vimeo_septuplet_matlabLRx4/sequences/00002/0001'
    lq = np.stack([cv2.imread(str(seq / f'im{k}.png'))[:, :, ::-1] for k in range(1, 8)]).astype(np.float32) / 255
    out = Upsampler()(torch.from_numpy(lq.copy()).permute(0, 3, 1, 2)[None])[0]
    centre = tensor2img(out[3])  # output frame 3 = im4
    gt = cv2.imread(str(vimeo / 'vimeo_septuplet/sequences/00002/0001/im4.png'))
    assert results['clips'] == {
        '00002/0001': pytest.approx(
            {
                'psnr': calculate_psnr(centre, gt, 0),
                'ssim': calculate_ssim(centre, gt, 0),
                'psnr_y': calculate_psnr(centre, gt, 2, test_y_channel=True),
                'ssim_y': calculate_ssim(centre, gt, 2, test_y_channel=True),
            },
            abs=1e-9,
        )
    }
    assert results['num_frames'] == 1 and results['center_frame_only']
    saved = cv2.imread(str(tmp_path / 'visualization' / 'Vimeo90K-T' / '00002' / '0001' / 'im4.png'))
    np.testing.assert_array_equal(saved, centre)

    # without center_frame_only the single GT frame is rejected with a clear message
    model.opt['val']['center_frame_only'] = False
    with pytest.raises(ValueError, match='center_frame_only'):
        model._validate(dataset, 'unit', None, save_img=False)
