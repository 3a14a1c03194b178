"""GSMNet behaviour beyond the golden set: input checks, checkpointing, loading, odd depths, gradients."""

from __future__ import annotations

import pytest
import torch

from gsmsr import GSMNet, load_checkpoint
from gsmsr.archs.flow import compose, gather_scatter_flows, warp
from gsmsr.archs.gsmnet_arch import FramePixelShuffle

TINY = dict(upscale=4, prop_depth=2, attn_depth=2, pa_frame=1, embed_dims=8, num_heads=2)


def _perturbed(net: GSMNet, seed: int = 0) -> GSMNet:
    """Give every parameter a random value so that no branch is an exact identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


@pytest.fixture(scope='module')
def tiny_net():
    torch.manual_seed(0)
    return _perturbed(GSMNet(**TINY)).double().eval()


def _clip(t=3, h=33, w=35, seed=1):
    return torch.rand(1, t, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize(
    'shape, match',
    [
        ((1, 1, 3, 40, 40), 'at least 2 frames'),
        ((1, 3, 3, 32, 40), 'H, W >= 33'),
        ((1, 3, 3, 40, 20), 'H, W >= 33'),
        ((1, 3, 4, 40, 40), '3 channels'),
        ((3, 3, 40, 40), r'\(B, T, C, H, W\)'),
    ],
)
def test_bad_input_shapes(tiny_net, shape, match):
    with pytest.raises(ValueError, match=match):
        tiny_net(torch.rand(*shape, dtype=torch.float64))


def test_non_float_input(tiny_net):
    with pytest.raises(TypeError, match='floating'):
        tiny_net(torch.zeros(1, 3, 3, 40, 40, dtype=torch.uint8))


@pytest.mark.parametrize(
    'kwargs, match',
    [(dict(embed_dims=10, num_heads=2), 'divisible'), (dict(anchor='middle'), 'anchor'), (dict(upscale=5), 'upscale')],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GSMNet(**{**TINY, **kwargs})


def test_checkpointing_changes_memory_not_values():
    torch.manual_seed(0)
    tiny = {**TINY, 'upscale': 2}  # x2: the checkpointed blocks all come before the upsampler, x4 only costs time
    plain = _perturbed(GSMNet(**tiny)).double().train()
    ckpt = GSMNet(**tiny, use_checkpoint_attn=True, use_checkpoint_ffn=True, use_checkpoint_mlp=True)
    ckpt = ckpt.double().train()
    ckpt.load_state_dict(plain.state_dict())
    lq = _clip()
    outs, grads = [], []
    for net in (plain, ckpt):
        out = net(lq)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    assert torch.equal(outs[0], outs[1]) or (outs[0] - outs[1]).abs().max() < 1e-13
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-10, atol=1e-13), name
    # train and eval mode compute the same function (no dropout / drop path / batch norm)
    with torch.no_grad():
        assert (plain.eval()(lq) - outs[0]).abs().max() < 1e-13


def test_every_parameter_gets_a_gradient(tiny_net):
    net = GSMNet(**TINY).double().train()
    net.load_state_dict(tiny_net.state_dict())
    net(_clip()).mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_gradients_match_finite_differences():
    """Analytic gradients of a whole tiny forward (scan, implicit warp, flows) against central differences."""
    torch.manual_seed(0)
    net = (
        _perturbed(GSMNet(upscale=2, prop_depth=2, attn_depth=1, pa_frame=1, embed_dims=4, num_heads=1), seed=3)
        .double()
        .eval()
    )
    lq = _clip(t=2, h=33, w=33)
    names = [
        'prop_layers.0.stage.mamba_block.mamba.dt_proj.bias',
        'prop_layers.1.stage.mamba_block.mamba.A_b_log',
        'implicit_align.q.bias',
        'spynet.basic_module.5.basic_module.8.bias',
    ]
    params = dict(net.named_parameters())
    base = {n: params[n].detach().clone() for n in names}

    def loss(values):
        return torch.func.functional_call(net, values, (lq,)).square().mean()

    inputs = {n: v.clone().requires_grad_() for n, v in base.items()}
    grads = dict(zip(names, torch.autograd.grad(loss(inputs), list(inputs.values()))))
    eps = 1e-6
    for name in names:
        for j in sorted({0, base[name].numel() - 1}):
            shifted = []
            for sign in (1, -1):
                v = base[name].clone().flatten()
                v[j] += sign * eps
                with torch.no_grad():
                    shifted.append(loss({**base, name: v.view_as(base[name])}))
            num = (shifted[0] - shifted[1]) / (2 * eps)
            ana = grads[name].flatten()[j]
            assert abs(num - ana) <= 1e-6 * max(1.0, abs(num)) + 1e-9, (name, j, float(num), float(ana))


def test_odd_prop_depth_returns_natural_time_order():
    """Official layers reverse time at every output; with odd P we restore natural order on purpose.

    Reference: one layer composed by hand in natural time (stage residual, then the reconstruction), which is
    what the official network computes before its final, unwanted flip.
    """
    torch.manual_seed(0)
    net = _perturbed(GSMNet(**{**TINY, 'prop_depth': 1})).double().eval()
    lq = _clip(t=3)
    with torch.no_grad():
        out = net(lq)
        fb, ff = net.get_flows(lq)
        x0 = net.conv_first(lq.transpose(1, 2))
        stage = net.prop_layers[0].stage
        x = x0 + net.sweep(stage.mamba_block, stage.attn_blocks(x0), net.window_flows(fb, ff))
        x = x0 + net.conv_after_body(net.norm(x.permute(0, 2, 3, 4, 1))).permute(0, 4, 1, 2, 3)
        x = net.conv_last(net.upsample(net.conv_before_upsample(x))).transpose(1, 2)
        b, t, c, h, w = lq.shape
        skip = torch.nn.functional.interpolate(
            lq.reshape(b * t, c, h, w), scale_factor=4, mode='bilinear', align_corners=False
        ).view_as(x)
        ref = x + skip
    assert torch.equal(out, ref)
    assert not torch.allclose(out, ref.flip(1))  # the time-reversed (official) order would differ


@pytest.mark.parametrize('r', [2, 3])
@pytest.mark.parametrize('channels_last', [True, False])
def test_frame_pixel_shuffle_is_pixel_shuffle(r, channels_last):
    """Same values as ``F.pixel_shuffle``; a channels-last volume's frames come out channels-last."""
    x = torch.rand(2, 4 * r * r, 3, 5, 6)  # (B, C, T, H, W)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    out = FramePixelShuffle(r)(x.transpose(1, 2))
    assert torch.equal(out, torch.nn.functional.pixel_shuffle(x.transpose(1, 2).contiguous(), r))
    assert out.transpose(1, 2).is_contiguous(memory_format=torch.channels_last_3d) == channels_last
    assert torch.equal(FramePixelShuffle(r)(x[:, :, 0]), torch.nn.functional.pixel_shuffle(x[:, :, 0], r))  # 4-D


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_reconstruction_runs_channels_last(dtype):
    """The streaming reconstruction gives its convs channels-last inputs, and its frames equal the channel-first form
    (contiguous volumes, ``nn.PixelShuffle``) within a conv's rounding of another sum order."""
    torch.manual_seed(0)
    net = _perturbed(GSMNet(**TINY)).eval()
    convs = [net.conv_first, net.conv_before_upsample[0], net.conv_last]
    convs += [m for m in net.upsample if isinstance(m, torch.nn.Conv3d)]
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append((m, a[0]))) for m in convs]
    lq = _clip(t=3).float()
    x = torch.randn(1, TINY['embed_dims'], 3, 33, 35)
    autocast = torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    with torch.no_grad(), autocast:
        net(lq)
        for h in hooks:
            h.remove()
        x0 = net.conv_first(lq.transpose(1, 2).contiguous(memory_format=torch.channels_last_3d))
        out = net.reconstruct(x, x0, lq)
        y = net.conv_first(lq.transpose(1, 2)) + net.conv_after_body(net.norm(x.permute(0, 2, 3, 4, 1))).permute(
            0, 4, 1, 2, 3
        )
        y = net.conv_before_upsample(y.contiguous())
        for m in net.upsample:
            y = torch.nn.functional.pixel_shuffle(y, m.upscale_factor) if isinstance(m, FramePixelShuffle) else m(y)
            y = y.contiguous()
        b, t, c, h, w = lq.shape
        skip = torch.nn.functional.interpolate(lq.reshape(b * t, c, h, w), scale_factor=4, mode='bilinear')
        ref = net.conv_last(y).transpose(1, 2) + skip.view(b, t, c, 4 * h, 4 * w)
    # conv_first runs first for the propagation's features (channel-first: updated in place, frame by frame)
    late = [(m, a) for m, a in seen if m is not net.conv_first] + [(m, a) for m, a in seen if m is net.conv_first][1:]
    assert {id(m) for m, _ in late} == {id(m) for m in convs}
    # CPU's fp32 conv3d returns channel-first whatever its input (cuDNN and CPU's bf16 convs keep the layout)
    ours = late if dtype == torch.bfloat16 else [(m, a) for m, a in late if m in (net.conv_first, convs[1])]
    assert all(a.is_contiguous(memory_format=torch.channels_last_3d) for _, a in ours)
    assert out.is_contiguous()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_loader_strict_errors_and_prefixes(tmp_path, tiny_net):
    sd = tiny_net.state_dict()
    path = tmp_path / 'net.pth'
    torch.save(
        {
            'params': {'module.' + k: v for k, v in sd.items()},
            'params_ema': {k: v + 1 for k, v in sd.items() if v.is_floating_point()},
        },
        path,
    )
    net = GSMNet(**TINY).double()
    load_checkpoint(net, path, key='params')
    assert all(torch.equal(net.state_dict()[k], v) for k, v in sd.items())
    load_checkpoint(net, path, key='params_ema')  # index buffers missing in the file: recomputed ones kept
    assert torch.equal(net.conv_first.bias, sd['conv_first.bias'] + 1)
    bad = dict(sd)
    bad.pop('conv_first.weight')
    bad['extra.weight'] = torch.zeros(1)
    bad['conv_last.bias'] = torch.zeros(7)
    torch.save(bad, path)
    with pytest.raises(ValueError) as err:
        load_checkpoint(net, path)
    msg = str(err.value)
    assert 'missing (1): conv_first.weight' in msg and 'extra.weight' in msg and 'conv_last.bias' in msg
    assert str(path) in msg
    with pytest.raises(KeyError, match='params_ema'):
        torch.save({'params': sd}, path)
        load_checkpoint(net, path, key='params_ema')
    with pytest.raises(FileNotFoundError):
        load_checkpoint(net, tmp_path / 'nope.pth')
    (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='junk.pth'):
        load_checkpoint(net, tmp_path / 'junk.pth')


def test_official_compose_order_is_reversed():
    """Two-hop gather flow: the official order composes legs the other way round from the textbook (§5.2)."""
    g = torch.Generator().manual_seed(0)
    lb = [torch.randn(1, 2, 9, 9, generator=g, dtype=torch.float64) for _ in range(4)]
    lf = [torch.randn(1, 2, 9, 9, generator=g, dtype=torch.float64) for _ in range(4)]
    gather, scatter = gather_scatter_flows(lb, lf, anchor=2, compose_order='official')
    assert gather[2] is None and scatter[2] is None
    assert torch.equal(gather[1], lf[1]) and torch.equal(gather[3], lb[2])
    assert torch.equal(scatter[1], lb[1]) and torch.equal(scatter[3], lf[2])
    assert torch.equal(gather[0], lf[0] + warp(lf[1], lf[0]))
    assert torch.equal(gather[4], lb[3] + warp(lb[2], lb[3]))
    assert torch.equal(scatter[0], lb[1] + warp(lb[0], lb[1]))
    assert torch.equal(scatter[4], lf[2] + warp(lf[3], lf[2]))
    geo, _ = gather_scatter_flows(lb, lf, anchor=2, compose_order='geometric')
    assert torch.equal(geo[0], compose(lf[1], lf[0]))


def test_window_attention_slicing_is_exact(monkeypatch):
    """Attending windows in slices (memory bound) gives the same values as all windows at once; without autograd
    the slices are equal steps of at most max_windows windows, with autograd max_windows_grad."""
    from gsmsr.archs.swsa import SWSAGroup, WindowAttention

    torch.manual_seed(0)
    group = SWSAGroup(8, depth=2, num_heads=2).double()
    x = torch.randn(2, 8, 3, 19, 21, dtype=torch.float64)  # padded, shifted, masked, batch 2
    with torch.no_grad():
        whole = group(x)
    slices = []
    attend = WindowAttention._attend
    monkeypatch.setattr(WindowAttention, '_attend', lambda self, x, *a: slices.append(len(x)) or attend(self, x, *a))
    monkeypatch.setattr(WindowAttention, 'max_windows', 5)
    with torch.no_grad():
        sliced = group(x)
    assert set(slices) == {4}  # 2 x 12 windows: the largest divisor of 24 in (5 / 2, 5]
    assert torch.equal(whole, sliced) or (whole - sliced).abs().max() < 1e-14
    slices.clear()
    monkeypatch.setattr(WindowAttention, 'max_windows_grad', 7)
    sliced = group(x)  # autograd on (the parameters require it)
    assert max(slices) == 7 and sliced.requires_grad
    assert (whole - sliced.detach()).abs().max() < 1e-14


def test_bf16_autocast_keeps_warp_geometry_exact():
    """Under bf16 autocast the scatter warp must still address columns beyond 256 exactly (§11.13)."""
    parity = (torch.arange(300) % 2).float().repeat(1, 1, 2, 1)  # (1, 1, 2, 300), exact in bf16
    flow = torch.zeros(1, 2, 2, 300)
    flow[:, 0] = 1.0  # read one column to the right
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = warp(parity.to(torch.bfloat16), flow)
    # a bf16 grid would land on even columns only past 256
    assert (out[0, 0, 0, :299] - parity[0, 0, 0, 1:]).abs().max() < 1e-4


def test_spynet_path_loads_basicsr_spynet_strictly(tmp_path):
    from basicsr.archs.spynet_arch import SpyNet

    ref = SpyNet()
    path = tmp_path / 'spynet.pth'
    torch.save({'params': {k: v for k, v in ref.state_dict().items() if k not in ('mean', 'std')}}, path)
    net = GSMNet(**TINY, spynet_path=str(path))
    assert all(torch.equal(a, b) for a, b in zip(net.spynet.parameters(), ref.parameters()))
    torch.save({'params': {'foo': torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match='not a SpyNet checkpoint: unexpected keys foo'):
        GSMNet(**TINY, spynet_path=str(path))
    torch.save({'params': {'basic_module.0.basic_module.0.weight': torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match='spynet.pth: not a SpyNet checkpoint'):
        GSMNet(**TINY, spynet_path=str(path))


@pytest.mark.parametrize(
    'kwargs, t, slab, whole',
    [
        ({}, 2, 8, 0),
        ({}, 9, 2, 0),
        ({}, 9, 2, 20),  # at most stream_whole frames: SWSA once over the whole clip
        ({'prop_depth': 3, 'attn_depth': 3, 'pa_frame': 2}, 9, 2, 0),
        ({'anchor': 'last', 'scatter': False, 'pa_frame': 2}, 9, 4, 0),
        ({'alternate_direction': False, 'mamba_directions': 1}, 9, 2, 0),
        ({'attn_depth': 3}, 13, 4, 0),  # one slab of slab + 2 halo + 1 frames: the clip in one go
        ({'attn_depth': 3}, 17, 4, 0),  # two slabs, the last one frame longer (odd clip)
    ],
)
def test_streaming_eval_equals_whole_clip_schedule(kwargs: dict, t: int, slab: int, whole: int):
    """The streaming schedule (no autograd) computes the whole-clip layers' values (float64, odd sizes)."""
    torch.manual_seed(0)
    # x2: neither schedule depends on the scale, and the x4 upsampler was a third of a float64 forward's CPU time
    net = _perturbed(GSMNet(**{**TINY, 'upscale': 2, **kwargs})).double().eval()
    net.stream_slab, net.stream_whole = slab, whole
    lq = _clip(t=t, h=35, w=41)
    with torch.no_grad():
        # both schedules take the clip's flows from get_flows, which neither schedule changes: computed once here,
        # since SpyNet in float64 was half of a forward's CPU time
        flows = net.get_flows(lq)
        net.get_flows = lambda x: flows  # the net sees only lq below
        net.streaming_eval = False
        ref = net(lq)
        net.streaming_eval = True
        out = net(lq)
    assert (out - ref).abs().max() <= 1e-10


def test_streaming_slabs_are_written_over_by_their_blocks(monkeypatch):
    """Over volumes of several explicit steps, the streaming schedule gives each SWSA group a channels-last slab copy
    and every block of it its input to write over (own, contiguous: no volume for the merge's result), and still
    computes the whole-clip layers' values (float64)."""
    from gsmsr.archs.swsa import SWSABlock, WindowAttention

    torch.manual_seed(0)
    monkeypatch.setattr(WindowAttention, 'max_windows', 8)  # a 6-frame slab holds 3 x 5 x 6 windows
    net = _perturbed(GSMNet(**TINY)).double().eval()
    net.stream_slab, net.stream_whole = 2, 0
    lq = _clip(t=9, h=35, w=41)
    given = []
    forward = SWSABlock.forward
    monkeypatch.setattr(
        SWSABlock,
        'forward',
        lambda blk, x, lab, own=False: given.append(own and x.is_contiguous()) or forward(blk, x, lab, own),
    )
    with torch.no_grad():
        net.streaming_eval = False
        ref = net(lq)
        given.clear()
        net.streaming_eval = True
        out = net(lq)
    assert len(given) > 4 and all(given)
    assert (out - ref).abs().max() <= 1e-10


def test_window_flows_have_one_layout():
    """Every window's flows have the same strides whatever the window's position and the clip's length: compiled
    window steps guard on strides, so one layout is one graph (views into the clip's flows gave three per clip, and
    new ones for every clip length)."""
    torch.manual_seed(0)
    net = GSMNet(**TINY).double().eval()
    layouts = set()
    for t in (4, 7):
        fb, ff = net.get_flows(_clip(t=t, h=35, w=41))
        for flows in (net.window_flows(fb, ff), net.window_flows(ff.flip(1), fb.flip(1))):
            for gather, scatter in flows[:t]:
                layouts.add(tuple(None if f is None else (tuple(f.shape), f.stride()) for f in (*gather, *scatter)))
    assert len(layouts) == 1, layouts


def test_forward_frames_are_the_forward_in_pieces():
    """forward_frames: on the streaming schedule one piece per reconstruction step (``stream_frame_pixels``: two
    frames here), in order, together the forward's output bit for bit; with autograd one piece, the whole clip. The
    input is checked at the call, before any piece is taken."""
    net = _perturbed(GSMNet(**{**TINY, 'upscale': 2, 'prop_depth': 1})).eval()
    net.stream_frame_pixels = 2 * 33 * 33
    lq = _clip(t=5, h=33, w=33).float()
    with torch.no_grad():
        want = net(lq)
        pieces = list(net.forward_frames(lq))
    assert [frames for frames, _ in pieces] == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert torch.equal(torch.cat([out for _, out in pieces], 1), want)
    whole = list(net.forward_frames(lq))
    assert len(whole) == 1 and whole[0][0] == slice(0, 5) and whole[0][1].requires_grad
    with pytest.raises(ValueError, match='channels'):
        net.forward_frames(lq[:, :, :2])
