"""GSMNet against the official network's golden tensors (float64 oracle, random weights, official keys)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gsmsr import GSMNet, load_checkpoint

# Checked into the repository (see tests/data/golden/README.md), so these tests always run.
GOLDEN_DIR = Path(__file__).resolve().parents[1] / 'data' / 'golden'
MAIN = GOLDEN_DIR / 'gsm_small_public.pt'
INTER = GOLDEN_DIR / 'gsm_small_public_intermediates.pt'


@pytest.fixture(scope='module')
def golden():
    return torch.load(MAIN, weights_only=True), torch.load(INTER, weights_only=True)


def _capture(net: GSMNet, lq: torch.Tensor):
    """Run ``net`` recording conv_first's output, every layer's input/output and the body feature."""
    seen = {'layer_in': []}
    hooks = [
        net.conv_first.register_forward_hook(lambda m, i, o: seen.__setitem__('feat_first', o)),
        net.norm.register_forward_hook(lambda m, i, o: seen.__setitem__('last', i[0].permute(0, 4, 1, 2, 3))),
        net.conv_before_upsample.register_forward_hook(lambda m, i, o: seen.__setitem__('feat_body', i[0])),
    ]
    hooks += [
        layer.stage.attn_blocks.register_forward_hook(lambda m, i, o: seen['layer_in'].append(i[0]))
        for layer in net.prop_layers
    ]
    try:
        with torch.no_grad():
            out = net(lq)
    finally:
        for h in hooks:
            h.remove()
    # official PropLayer k outputs are the inputs of layer k+1 (time-reversed after every layer);
    # the last one is the input of the final norm
    seen['layers'] = seen['layer_in'][1:] + [seen['last']]
    return out, seen


def test_float64_matches_official(golden):
    data, inter = golden
    net = GSMNet(**data['config']).double().eval()
    load_checkpoint(net, data['state_dict'], strict=True)
    lq = data['input']
    with torch.no_grad():
        fb, ff = net.get_flows(lq)
    assert (fb - inter['flows_backward']).abs().max() <= 1e-9
    assert (ff - inter['flows_forward']).abs().max() <= 1e-9
    net.streaming_eval = False  # the hooks read whole-clip layer inputs
    out, seen = _capture(net, lq)
    assert (seen['feat_first'] - inter['feat_first']).abs().max() <= 1e-9
    for k, feat in enumerate(seen['layers']):
        assert (feat - inter[f'feat_after_layer_{k}']).abs().max() <= 1e-9, f'layer {k}'
    assert (seen['feat_body'] - inter['feat_body']).abs().max() <= 1e-9
    assert (out - data['output']).abs().max() <= 1e-10
    net.streaming_eval = True
    with torch.no_grad():
        assert (net(lq) - data['output']).abs().max() <= 1e-10


def test_float32_matches_official(golden):
    data, _ = golden
    net = GSMNet(**data['config']).eval()
    load_checkpoint(net, {k: v.float() if v.is_floating_point() else v for k, v in data['state_dict'].items()})
    for streaming in (True, False):
        net.streaming_eval = streaming
        with torch.no_grad():
            out = net(data['input'].float())
        assert (out.double() - data['output']).abs().max() <= 1e-5, f'streaming_eval={streaming}'


def test_released_config_matches_manifest():
    manifest = [line.split('\t') for line in (GOLDEN_DIR / 'official_state_dict_manifest.tsv').read_text().splitlines()]
    net = GSMNet()
    sd = net.state_dict()
    assert sorted(sd) == sorted(k for k, _, _ in manifest)
    for key, shape, dtype in manifest:
        assert list(sd[key].shape) == [int(s) for s in shape.strip('[]').split(',') if s.strip()], key
        assert sd[key].dtype == getattr(torch, dtype), key
    assert sum(p.numel() for p in net.parameters()) == 10_455_919
