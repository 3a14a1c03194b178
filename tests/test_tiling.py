"""Tests for gsmsr.tiling: the official chunk/tile protocol (ARCHITECTURE.md §9)."""

import pytest
import torch
import torch.nn.functional as F

from gsmsr.tiling import (
    accumulate_tiles,
    chunk_length,
    forward_chunked,
    tile_frames,
    tile_regions,
    tile_weight_map,
    window_starts,
)


def position_clip(b: int, t: int, h: int, w: int, dtype=torch.float64) -> torch.Tensor:
    """(B, T, 3, H, W) whose channels hold the absolute frame, row and column index of each pixel."""
    tt, yy, xx = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing='ij')
    pos = torch.stack([tt, yy, xx], dim=1).to(dtype)  # (T, 3, H, W)
    return pos.unsqueeze(0).repeat(b, 1, 1, 1, 1)


class OriginNet:
    """Outputs, at every HR pixel of a call, a constant code of the call's (frame, row, col) origin."""

    def __init__(self, scale: int):
        self.scale = scale
        self.calls = []

    @staticmethod
    def code(t0, y0, x0):
        return 1e6 * t0 + 1e3 * y0 + x0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _, h, w = x.shape
        t0, y0, x0 = (int(v) for v in x[0, 0, :, 0, 0])
        self.calls.append((t0, y0, x0, t, h, w))
        return torch.full((b, t, 1, self.scale * h, self.scale * w), self.code(t0, y0, x0), dtype=x.dtype)


def context_net(scale: int):
    """A net whose output depends on the whole call (tile mean, clip mean), so tiling/chunking changes it."""

    def net(x: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = x.shape
        up = F.interpolate(x.flatten(0, 1), scale_factor=scale, mode='nearest').view(b, t, c, scale * h, scale * w)
        return torch.sin(up) + x.mean(dim=(-1, -2), keepdim=True) + 0.1 * x.mean(dim=(1, -1, -2), keepdim=True)

    return net


def reference_forward(net, lq, scale, chunk, chunk_overlap, tile, tile_overlap):
    """Independent, literal re-implementation of §9 with full-size sum and weight tensors per chunk."""
    b, t, _, h, w = lq.shape

    def starts(n, size, ov):
        return [0] if size == 0 or size >= n else list(range(0, n - size, size - ov)) + [max(0, n - size)]

    length = min(chunk, t) if chunk else t
    th, tw = (min(tile, h), min(tile, w)) if tile else (h, w)
    k = tile_overlap // 2
    total, count = None, torch.zeros(1, t, 1, 1, 1, dtype=lq.dtype)
    for t0 in starts(t, chunk, chunk_overlap):
        clip = lq[:, t0 : t0 + length]
        rows, cols = starts(h, tile, tile_overlap), starts(w, tile, tile_overlap)
        e = wgt = None
        for i in rows:
            for j in cols:
                o = net(clip[..., i : i + th, j : j + tw]).clone()
                m = torch.ones_like(o)
                if e is None:
                    e = torch.zeros(*o.shape[:3], scale * h, scale * w, dtype=lq.dtype)
                    wgt = torch.zeros_like(e)
                if k > 0:
                    if i != rows[-1]:
                        o[..., -k:, :] = 0
                        m[..., -k:, :] = 0
                    if j != cols[-1]:
                        o[..., :, -k:] = 0
                        m[..., :, -k:] = 0
                    if i != rows[0]:
                        o[..., :k, :] = 0
                        m[..., :k, :] = 0
                    if j != cols[0]:
                        o[..., :, :k] = 0
                        m[..., :, :k] = 0
                e[..., i * scale : (i + th) * scale, j * scale : (j + tw) * scale] += o
                wgt[..., i * scale : (i + th) * scale, j * scale : (j + tw) * scale] += m
        if total is None:
            total = torch.zeros(b, t, *e.shape[2:], dtype=lq.dtype)
        total[:, t0 : t0 + length] += e / wgt
        count[:, t0 : t0 + length] += 1
    return total / count


def test_window_starts_official_values():
    assert window_starts(180, 144, 50) == [0, 36]
    assert window_starts(320, 144, 50) == [0, 94, 176]
    assert window_starts(100, 100, 2) == [0]
    assert window_starts(250, 100, 2) == [0, 98, 150]
    assert window_starts(10, 4, 1) == [0, 3, 6]
    assert window_starts(7, 0, 3) == [0]
    assert window_starts(5, 144, 50) == [0]
    with pytest.raises(ValueError, match='overlap'):
        window_starts(10, 4, 4)


def test_reds_tiles_rows_and_cols():
    scale = 4
    net = OriginNet(scale)
    lq = position_clip(1, 2, 180, 320)
    forward_chunked(net, lq, scale, chunk=100, chunk_overlap=2, tile=144, tile_overlap=50)
    assert sorted((c[1], c[2]) for c in net.calls) == [(y, x) for y in (0, 36) for x in (0, 94, 176)]
    assert all(c[3:] == (2, 144, 144) for c in net.calls)


@pytest.mark.parametrize('chunk,tile', [(0, 0), (6, 40), (100, 144)])
def test_single_chunk_single_tile_is_plain_forward(chunk, tile):
    torch.manual_seed(0)
    lq = torch.rand(2, 6, 3, 36, 40)
    net = context_net(4)
    out = forward_chunked(net, lq, 4, chunk=chunk, chunk_overlap=2, tile=tile, tile_overlap=10)
    assert torch.equal(out, net(lq))


def test_tile_blend_weights_analytic():
    """Pixels of the 180x320 x4 layout: which tiles count where, including the 25-px HR trims."""
    scale = 4
    net = OriginNet(scale)
    lq = position_clip(1, 2, 180, 320)
    out = forward_chunked(net, lq, scale, chunk=0, tile=144, tile_overlap=50)[0, 0, 0]
    c = OriginNet.code
    # Column tiles cover HR x [0,576), [376,952), [704,1280); inner edges drop 25 HR px.
    # Row tiles cover HR y [0,576), [144,720).
    checks = {
        (10, 10): c(0, 0, 0),  # only tile (0, 0)
        (10, 390): c(0, 0, 0),  # tile (0,94) is trimmed at x < 401
        (10, 560): c(0, 0, 94),  # tile (0,0) is trimmed at x >= 551
        (10, 450): (c(0, 0, 0) + c(0, 0, 94)) / 2,  # both count
        (10, 710): c(0, 0, 94),  # tile (0,176) is trimmed at x < 729
        (10, 940): c(0, 0, 176),  # tile (0,94) is trimmed at x >= 927
        (10, 1279): c(0, 0, 176),  # right image border: never trimmed
        (150, 10): c(0, 0, 0),  # tile (36,0) is trimmed at y < 169
        (560, 10): c(0, 36, 0),  # tile (0,0) is trimmed at y >= 551
        (300, 450): (c(0, 0, 0) + c(0, 0, 94) + c(0, 36, 0) + c(0, 36, 94)) / 4,
        (719, 1279): c(0, 36, 176),
    }
    for (y, x), expected in checks.items():
        assert out[y, x].item() == pytest.approx(expected, rel=1e-12), (y, x)
    weight = tile_weight_map(180, 320, scale, 144, 50, dtype=torch.float64)
    assert weight.min().item() == 1 and weight.max().item() == 4
    assert weight[300, 450].item() == 4 and weight[10, 560].item() == 1


def test_chunk_boundaries_analytic():
    """T=10, chunk 4, overlap 1: chunks start at 0, 3, 6; overlapped frames 3 and 6 are averaged."""
    net = OriginNet(2)
    lq = position_clip(1, 10, 8, 8)
    out = forward_chunked(net, lq, 2, chunk=4, chunk_overlap=1, tile=0, tile_overlap=0)
    assert [call[0] for call in net.calls] == [0, 3, 6]
    c = OriginNet.code
    expected = (
        [c(0, 0, 0)] * 3
        + [(c(0, 0, 0) + c(3, 0, 0)) / 2]
        + [c(3, 0, 0)] * 2
        + [(c(3, 0, 0) + c(6, 0, 0)) / 2]
        + [c(6, 0, 0)] * 3
    )
    got = out[0, :, 0].flatten(1)
    assert torch.equal(got.min(dim=1).values, got.max(dim=1).values)
    assert got[:, 0].tolist() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    'frames,chunk,overlap,length,starts',
    [
        (100, 32, 4, 28, [0, 24, 48, 72]),  # 112 frames of work instead of 128 (chunks of 32 at 0, 28, 56, 68)
        (32, 32, 4, 32, [0]),  # T = N: one chunk
        (20, 32, 4, 20, [0]),  # T < N: one chunk of T
        (3, 32, 4, 3, [0]),  # T <= overlap
        (33, 32, 4, 20, [0, 13]),  # T = N + 1: two chunks of 19, rounded up to even
        (9, 8, 2, 6, [0, 3]),  # T = N + 1
        (13, 10, 2, 8, [0, 5]),
        (13, 8, 2, 8, [0, 5]),  # already balanced
        (40, 32, 0, 20, [0, 20]),  # overlap 0
        (33, 32, 0, 18, [0, 15]),  # overlap 0, 17 rounded up to even
        (65, 32, 0, 22, [0, 22, 43]),
        (15, 8, 2, 8, [0, 6, 7]),  # odd 7 rounded up to the maximum
        (16, 9, 1, 9, [0, 7]),  # odd 9 kept: 10 exceeds the maximum
        (57, 31, 4, 31, [0, 26]),  # odd maximum
    ],
)
def test_chunk_length_table(frames, chunk, overlap, length, starts):
    assert chunk_length(frames, chunk, overlap) == length
    assert window_starts(frames, length, overlap) == starts


def test_chunk_length_unknown_count_and_whole_clip():
    assert chunk_length(None, 32, 4) == 32  # unknown count: the maximum, as before balancing
    assert chunk_length(None, 0, 0) == 0 and chunk_length(100, 0, 4) == 0  # 0: the whole clip in one chunk
    for chunk, overlap in [(-1, 0), (4, 4), (4, -1)]:
        with pytest.raises(ValueError):
            chunk_length(10, chunk, overlap)


def test_chunk_length_is_the_fewest_shortest_chunks():
    """For every small (T, N, overlap): the fewest chunks of at most N; the shortest length giving that many, or one
    frame more to make it even; even unless it is N or T; the chunks cover the clip with at least ``overlap``."""
    for chunk in range(2, 17):
        for overlap in range(chunk):
            for t in range(2, 50):
                length = chunk_length(t, chunk, overlap)
                if t <= chunk:
                    assert length == t
                    continue
                starts = window_starts(t, length, overlap)
                fewest = -(-(t - overlap) // (chunk - overlap))
                shortest = min(n for n in range(overlap + 1, chunk + 1) if len(window_starts(t, n, overlap)) <= fewest)
                assert len(starts) == fewest and length <= chunk, (t, chunk, overlap)
                assert length in (shortest, shortest + 1) and (length % 2 == 0 or length == chunk), (t, chunk, overlap)
                assert starts[-1] + length == t and all(b - a <= length - overlap for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize(
    'shape,scale,chunk,chunk_overlap,tile,tile_overlap',
    [
        ((1, 7, 3, 50, 61), 2, 3, 1, 20, 6),  # 3 chunks (last one realigned), 3x4 tiles
        ((2, 5, 3, 33, 47), 3, 2, 0, 16, 5),  # odd overlap, chunks without overlap
        ((1, 4, 3, 30, 29), 4, 0, 0, 12, 4),  # no chunking
        ((1, 9, 3, 18, 80), 2, 4, 2, 144, 50),  # no tiling (tile larger than the frame)
        ((1, 3, 3, 180, 320), 4, 2, 1, 144, 50),  # the REDS layout
    ],
)
def test_matches_reference_float64(shape, scale, chunk, chunk_overlap, tile, tile_overlap):
    torch.manual_seed(1)
    lq = torch.rand(*shape, dtype=torch.float64)
    net = context_net(scale)
    out = forward_chunked(net, lq, scale, chunk, chunk_overlap, tile, tile_overlap)
    ref = reference_forward(net, lq, scale, chunk, chunk_overlap, tile, tile_overlap)
    assert out.dtype == torch.float64 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_accumulate_tiles_frame_weight_and_regions():
    """frame_weight scales frames; the trimmed tiles exactly cover the HR frame (weight map >= 1)."""
    torch.manual_seed(2)
    lq = torch.rand(1, 3, 3, 40, 50, dtype=torch.float64)
    net = context_net(2)
    fw = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    plain = accumulate_tiles(net, lq, 2, 16, 6)
    weighted = accumulate_tiles(net, lq, 2, 16, 6, frame_weight=fw)
    torch.testing.assert_close(weighted, plain * fw.view(1, 3, 1, 1, 1), rtol=1e-15, atol=0)
    assert tile_weight_map(40, 50, 2, 16, 6).min().item() >= 1
    regions = tile_regions(40, 50, 16, 6)
    assert {(r.y0, r.x0) for r in regions} == {(y, x) for y in (0, 10, 20, 24) for x in (0, 10, 20, 30, 34)}


@pytest.mark.parametrize('tile_batch', [2, 3, 100])
def test_accumulate_tiles_batched_equals_one_at_a_time(tile_batch):
    """Tiles stacked along the batch axis give the same sum as one call per tile; every call has one batch size
    (a short last group is filled up with repeated tiles, whose outputs are dropped)."""
    torch.manual_seed(3)
    lq = torch.rand(2, 3, 3, 40, 50, dtype=torch.float64)
    net = context_net(2)
    fw = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    one = accumulate_tiles(net, lq, 2, 16, 6, frame_weight=fw)
    calls = []
    batched = accumulate_tiles(
        lambda x: calls.append(x.shape[0]) or net(x), lq, 2, 16, 6, frame_weight=fw, tile_batch=tile_batch
    )
    torch.testing.assert_close(batched, one, rtol=0, atol=1e-14)
    n_tiles = len(tile_regions(40, 50, 16, 6))
    per_call = min(tile_batch, n_tiles)
    assert calls == [2 * per_call] * -(-n_tiles // per_call)


def test_rejects_wrong_output_shape():
    lq = torch.rand(1, 2, 3, 20, 20)
    with pytest.raises(RuntimeError, match='expected'):
        forward_chunked(lambda x: x, lq, 4, chunk=0, tile=0)


def test_tile_frames_gives_each_frame_once_its_last_tile_piece_is_added():
    """A network in pieces of frames (2, 2, 1 of 5): tile_frames adds what accumulate_tiles adds, and yields frame t
    right after the last tile call's piece holding t, before the next piece is computed; nothing before that call.
    Pieces out of order are refused."""
    torch.manual_seed(4)
    lq = torch.rand(1, 5, 3, 30, 40, dtype=torch.float64)
    net = context_net(2)
    fw = torch.linspace(0.5, 1.5, 5, dtype=torch.float64)
    log = []

    def pieces(x):
        out = net(x)
        for s in (slice(0, 2), slice(2, 4), slice(4, 5)):
            log.append(('piece', s.start))
            yield s, out[:, s]

    tiles = len(tile_regions(30, 40, 16, 6))
    got = None
    for t, acc in tile_frames(pieces, lq, 2, 16, 6, frame_weight=fw, tile_batch=2):
        log.append(('frame', t))
        got = acc
    torch.testing.assert_close(got, accumulate_tiles(net, lq, 2, 16, 6, frame_weight=fw), rtol=0, atol=1e-14)
    last_call = [('piece', 0), ('frame', 0), ('frame', 1), ('piece', 2), ('frame', 2), ('frame', 3)]
    last_call += [('piece', 4), ('frame', 4)]
    assert log == [('piece', s) for _ in range(-(-tiles // 2) - 1) for s in (0, 2, 4)] + last_call

    def shuffled(x):
        out = net(x)
        yield slice(2, 5), out[:, 2:]
        yield slice(0, 2), out[:, :2]

    with pytest.raises(RuntimeError, match='frames 2:5'):
        list(tile_frames(shuffled, lq, 2, 16, 6))
