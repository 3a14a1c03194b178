"""GSMModel training mechanics: flow_lr_mul / fix_flow act on SpyNet only, EMA, guards, bf16, clipping,
chunked evaluation, atomic checkpoints and checkpoint loading."""

from __future__ import annotations

import logging
from typing import Dict, List

import pytest
import torch
from basicsr.models import build_model

from conftest import make_opt
from gsmsr.models import gsm_model


def batch(seed: int = 0, frames: int = 2) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lq = torch.rand(1, frames, 3, 36, 36, generator=g)
    gt = torch.nn.functional.interpolate(lq.flatten(0, 1), scale_factor=4, mode='bicubic', align_corners=False)
    gt = (gt + 0.05 * torch.rand(gt.shape, generator=g)).clamp(0, 1).view(1, frames, 3, 144, 144)
    return {'lq': lq, 'gt': gt}


def snapshot(net: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.named_parameters()}


def changed(before: Dict[str, torch.Tensor], net: torch.nn.Module) -> List[str]:
    return [k for k, v in net.named_parameters() if not torch.equal(before[k], v.detach())]


class LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def basicsr_log():
    handler = LogCapture()
    logger = logging.getLogger('basicsr')
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def test_flow_lr_mul_fix_flow_and_ema(tmp_path):
    torch.manual_seed(0)
    model = build_model(make_opt(tmp_path))
    net = model.net_g
    names = [n for n, _ in net.named_parameters()]
    flow = {n for n in names if n.startswith('spynet.')}
    assert flow and len(flow) < len(names)
    assert {n for n in names if gsm_model.is_flow_param(n)} == flow

    # flow_lr_mul: exactly the SpyNet parameters form the second group, at lr x 0.125
    by_id = {id(p): n for n, p in net.named_parameters()}
    groups = model.optimizer_g.param_groups
    assert len(groups) == 2
    assert {by_id[id(p)] for p in groups[0]['params']} == set(names) - flow
    assert {by_id[id(p)] for p in groups[1]['params']} == flow
    assert groups[1]['lr'] == pytest.approx(0.125 * groups[0]['lr'])

    # iteration 1 < fix_flow: SpyNet gets zero gradients (Adam moments stay 0) and does not move
    before = snapshot(net)
    model.feed_data(batch(0))
    model.update_learning_rate(1)
    model.optimize_parameters(1)
    moved = set(changed(before, net))
    assert not moved & flow
    assert len(moved) > 0.9 * (len(names) - len(flow))
    for n, p in net.named_parameters():
        if n in flow:
            assert torch.count_nonzero(p.grad) == 0
            assert torch.count_nonzero(model.optimizer_g.state[p]['exp_avg']) == 0

    # iteration 2 = fix_flow: SpyNet trains
    ema_1 = snapshot(model.net_g_ema)
    before = snapshot(net)
    model.feed_data(batch(1))
    model.update_learning_rate(2)
    model.optimize_parameters(2)
    assert set(changed(before, net)) & flow
    assert any(torch.count_nonzero(p.grad) for n, p in net.named_parameters() if n in flow)

    # EMA (decay 0.5) of the parameters: ema_2 = 0.5 ema_1 + 0.5 params_2, and it differs from the raw weights
    raw = dict(net.named_parameters())
    for n, p in model.net_g_ema.named_parameters():
        torch.testing.assert_close(p.detach(), 0.5 * ema_1[n] + 0.5 * raw[n].detach(), rtol=0, atol=1e-7)
    assert any(not torch.equal(p, raw[n]) for n, p in model.net_g_ema.named_parameters())

    # validation uses the EMA network, and starts its kernels' compilation once per clip size
    ahead = []
    model.net_g_ema.compile_kernels_ahead = lambda shape: ahead.append(tuple(shape))
    model.lq = batch(2)['lq']
    model.test()
    model.test()
    assert ahead == [tuple(model.lq.shape)]
    del model.net_g_ema.compile_kernels_ahead
    with torch.no_grad():
        expected_ema = model.net_g_ema(model.lq)
        raw_output = net.eval()(model.lq)
    torch.testing.assert_close(model.output, expected_ema, rtol=0, atol=0)
    assert not torch.allclose(model.output, raw_output)


@pytest.mark.parametrize('use_bf16', [False, True])
def test_nonfinite_loss_skips_the_step(tmp_path, basicsr_log, use_bf16):
    torch.manual_seed(0)
    model = build_model(make_opt(tmp_path, train=dict(use_bf16=use_bf16)))
    data = batch(0)
    data['gt'][0, 0, 0, 0, 0] = float('nan')
    before, ema_before = snapshot(model.net_g), snapshot(model.net_g_ema)
    model.feed_data(data)
    model.optimize_parameters(3)
    assert not changed(before, model.net_g) and not changed(ema_before, model.net_g_ema)
    assert model.skipped_steps == 1
    assert any('Iter 3: skipped the step, non-finite loss' in m for m in basicsr_log.messages)


def test_bf16_and_grad_clipping(tmp_path):
    torch.manual_seed(0)
    model = build_model(make_opt(tmp_path, train=dict(use_bf16=True, grad_clip_norm=1e-4, fix_flow=None)))
    data = batch(0)
    with torch.no_grad():
        fp32_loss = model.cri_pix(model.net_g(data['lq']), data['gt']).item()
    before = snapshot(model.net_g)
    model.feed_data(data)
    model.optimize_parameters(1)
    log = model.get_current_log()
    # the bf16 forward gives a slightly different, finite loss than the fp32 forward of the same weights
    assert log['l_pix'] != fp32_loss and log['l_pix'] == pytest.approx(fp32_loss, rel=0.05)
    assert log['grad_norm'] > 1e-4
    clipped = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in model.net_g.parameters() if p.grad is not None])
    )
    assert clipped <= 1e-4 * (1 + 1e-3)
    assert changed(before, model.net_g)


def test_chunked_tiled_equals_whole_clip_when_one_window_covers_it(tmp_path):
    torch.manual_seed(0)
    model = build_model(make_opt(tmp_path, is_train=False))
    lq = batch(0, frames=3)['lq']
    outputs = []
    for chunk, tile in ((0, 0), (100, 144), (3, 36)):
        model.opt['val'].update(chunk=chunk, chunk_overlap=2, tile=tile, tile_overlap=50)
        model.lq = lq
        model.test()
        outputs.append(model.output)
    with torch.no_grad():
        direct = model.net_g(lq)
    torch.testing.assert_close(outputs[0], direct, rtol=0, atol=0)
    torch.testing.assert_close(outputs[1], direct, rtol=0, atol=0)
    torch.testing.assert_close(outputs[2], direct, rtol=0, atol=0)


def test_checkpoints_atomic_and_loadable(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = build_model(make_opt(tmp_path, is_train=False))
    net = model.net_g
    model.save_network([net, net], 'net_g', 7, param_key=['params', 'params_ema'])
    path = tmp_path / 'models' / 'net_g_7.pth'
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    assert set(ckpt) == {'params', 'params_ema'}
    assert all(torch.equal(ckpt['params'][k], v) for k, v in net.state_dict().items())

    # a failing write leaves neither the checkpoint nor a temporary file
    def broken_save(obj, f, *args, **kwargs):  # f: the temporary file, opened for writing
        f.write(b'partial')
        raise OSError('disk full')

    monkeypatch.setattr(gsm_model.torch, 'save', broken_save)
    monkeypatch.setattr(gsm_model.time, 'sleep', lambda s: None)
    with pytest.raises(OSError, match='disk full'):
        model.save_network(net, 'net_g', 8)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / 'models').iterdir()) == ['net_g_7.pth']

    # loading: the BasicSR file, a file without params_ema (falls back to params), and an official-style
    # bare state dict with DDP 'module.' prefixes all load strictly into a fresh network
    fresh = build_model(make_opt(tmp_path / 'fresh', is_train=False))
    only_params = tmp_path / 'only_params.pth'
    torch.save({'params': net.state_dict()}, only_params)
    bare = tmp_path / 'bare.pth'
    torch.save({f'module.{k}': v for k, v in net.state_dict().items()}, bare)
    for source in (path, only_params, bare):
        for p in fresh.net_g.parameters():
            torch.nn.init.zeros_(p)
        fresh.load_network(fresh.net_g, str(source), strict=True, param_key='params_ema')
        assert all(torch.equal(fresh.net_g.state_dict()[k], v) for k, v in net.state_dict().items())

    wrong = tmp_path / 'wrong.pth'
    torch.save({'params': {**net.state_dict(), 'extra.weight': torch.zeros(1)}}, wrong)
    with pytest.raises(ValueError, match='extra.weight'):
        fresh.load_network(fresh.net_g, str(wrong), strict=True, param_key='params')
