"""Tests for gsmsr.io_threads and the threaded ``gsmsr infer`` path: same bytes as the sequential path, bounded
queues, errors surfacing in the main thread with their own messages, and clean aborts (threads joined, no output)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import List

import cv2
import numpy as np
import pytest
import torch
from test_inference import (  # noqa: F401  (test_net_files: a fixture)
    InferTestNet,
    make_frames,
    read_video,
    run_cli,
    test_net_files,
    write_folder,
    write_video,
)

from gsmsr.inference import TIMELINE, upscale_frames, upscale_video
from gsmsr.io_threads import FrameWriter, ReadAhead
from gsmsr.video_io import FolderSink, FrameTag, open_sink, open_source


def worker_threads() -> List[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith('gsmsr-')]


def tree_bytes(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ----------------------------------------------------------------------------------------------- ReadAhead
def test_read_ahead_order_and_bound():
    state = dict(produced=0, consumed=0, most=0)

    def items():
        for i in range(50):
            state['produced'] += 1
            state['most'] = max(state['most'], state['produced'] - state['consumed'])
            yield i

    got = []
    for x in ReadAhead(items(), depth=3):
        got.append(x)
        state['consumed'] += 1
        time.sleep(0.002)  # a slow consumer: the producer runs into the bound
    assert got == list(range(50))
    # depth queued, one being put, one in the consumer's hands
    assert state['most'] <= 3 + 2, state
    assert worker_threads() == []


def test_read_ahead_reraises_at_the_failing_position():
    error = ValueError('frame 3: cannot decode image')

    def items():
        yield from range(3)
        raise error

    got = []
    with pytest.raises(ValueError) as info:
        for x in ReadAhead(items(), depth=8):
            got.append(x)
    assert info.value is error and got == [0, 1, 2]


def test_read_ahead_close_joins_a_blocked_producer():
    reader = ReadAhead(iter(range(10**6)), depth=2)
    assert next(iter(reader)) == 0
    reader.close()
    assert worker_threads() == []


# ----------------------------------------------------------------------------------------------- FolderSource
def test_folder_frames_are_decoded_side_by_side_and_yielded_in_order(tmp_path, monkeypatch):
    """DECODE_THREADS files decode at once; frames and tags come in file order, the same bytes as one imread after
    the other; a file that fails raises at its place after the frames before it; closing early joins the threads."""
    import cv2

    from gsmsr import video_io

    frames = make_frames(9, 36, 40)
    src = write_folder(tmp_path / 'in', frames)
    state = dict(now=0, most=0)
    lock = threading.Lock()
    imdecode = cv2.imdecode

    def slow_imdecode(*args):
        with lock:
            state['now'] += 1
            state['most'] = max(state['most'], state['now'])
        time.sleep(0.1)  # long enough that the decodes in flight overlap on a busy machine
        with lock:
            state['now'] -= 1
        return imdecode(*args)

    monkeypatch.setattr(video_io.cv2, 'imdecode', slow_imdecode)
    got = list(open_source(str(src)))
    assert [tag.index for _, tag in got] == list(range(9)) and [tag.name for _, tag in got] == [
        f'{i:05d}' for i in range(9)
    ]
    assert all(np.array_equal(rgb, f) for (rgb, _), f in zip(got, frames))
    assert state['most'] == video_io.DECODE_THREADS and worker_threads() == []

    good = (src / '00005.png').read_bytes()
    (src / '00005.png').write_bytes(good[: len(good) // 2])  # header intact, data cut
    seen = []
    with pytest.raises(video_io.InputError, match='00005.png: cannot decode image'):
        for _, tag in open_source(str(src)):
            seen.append(tag.index)
    assert seen == [0, 1, 2, 3, 4] and worker_threads() == []

    it = iter(open_source(str(src)))
    next(it)
    it.close()  # a consumer that stops early (an aborted run)
    assert worker_threads() == []


# ----------------------------------------------------------------------------------------------- FrameWriter
def frames_u8(n: int, h: int = 5, w: int = 6) -> List[torch.Tensor]:
    return [torch.full((h, w, 3), i, dtype=torch.uint8) for i in range(n)]


@pytest.mark.parametrize('threads', [1, 3])
def test_frame_writer_writes_everything(threads):
    written = []
    lock = threading.Lock()

    def write(rgb: np.ndarray, tag: int) -> None:
        with lock:
            written.append((tag, int(rgb[0, 0, 0]), rgb.shape))

    writer = FrameWriter(write, threads=threads, depth=2)
    for i, f in enumerate(frames_u8(20)):
        writer.submit(f, i)
    writer.finish()
    if threads == 1:  # in submission order
        assert [t for t, _, _ in written] == list(range(20))
    assert sorted(written) == [(i, i, (5, 6, 3)) for i in range(20)]
    assert worker_threads() == []


def test_frame_writer_bounds_pending_frames():
    state = dict(submitted=0, written=0, most=0)
    gate = threading.Event()

    def write(rgb, tag):
        gate.wait(5)
        state['written'] += 1

    writer = FrameWriter(write, threads=2, depth=3)

    def produce():
        for i, f in enumerate(frames_u8(12)):
            writer.submit(f, i)
            state['submitted'] += 1
            state['most'] = max(state['most'], state['submitted'] - state['written'])

    t = threading.Thread(target=produce)
    t.start()
    time.sleep(0.5)  # writers blocked: the producer stops at depth + threads frames
    assert state['submitted'] == 3 + 2
    gate.set()
    t.join(10)
    writer.finish()
    assert state['written'] == 12 and state['most'] <= 3 + 2


def test_frame_writer_error_surfaces_in_main_thread():
    error = OSError('out/00000003.png: cannot write PNG')

    def write(rgb, tag):
        if tag == 3:
            raise error

    writer = FrameWriter(write, threads=2, depth=2)
    with pytest.raises(OSError) as info:
        for i, f in enumerate(frames_u8(200)):
            writer.submit(f, i)
        writer.finish()
    assert info.value is error
    writer.abort()
    assert worker_threads() == []


def test_frame_writer_abort_drops_pending_and_joins():
    written = []
    writer = FrameWriter(lambda rgb, tag: (time.sleep(0.05), written.append(tag)), threads=1, depth=8)
    for i, f in enumerate(frames_u8(8)):
        writer.submit(f, i)
    writer.abort()
    assert worker_threads() == [] and len(written) < 8


# ----------------------------------------------------------------------------------------------- upscale_video
def sequential_reference(src: Path, out: Path, net, **kw) -> None:
    """The path before the threads: upscale_frames (synchronous) straight into the sink, in the main thread."""
    source = open_source(str(src))
    info = source.info
    sink = open_sink(str(out), 4 * info.width, 4 * info.height, info.rate, audio_from=None)
    pairs = list(source)
    source.close()
    for frame, (_, tag) in zip(upscale_frames([rgb for rgb, _ in pairs], net, frame_count=info.frames, **kw), pairs):
        sink.write(frame, tag)
    sink.commit()


@pytest.mark.parametrize('output', ['png', 'mp4'])
def test_threaded_output_is_byte_identical(tmp_path, output):
    torch.manual_seed(0)
    net = InferTestNet().eval()
    src = write_folder(tmp_path / 'in', make_frames(11, 36, 44))
    kw = dict(chunk=4, overlap=1, tile=24, tile_overlap=8)
    name = 'out' if output == 'png' else 'out.mp4'
    (tmp_path / 'a').mkdir()
    (tmp_path / 'b').mkdir()
    stats = upscale_video(str(src), str(tmp_path / 'a' / name), net, device='cpu', progress=False, **kw)
    sequential_reference(src, tmp_path / 'b' / name, net, **kw)
    a, b = tmp_path / 'a' / name, tmp_path / 'b' / name
    if output == 'png':
        assert len(list(a.iterdir())) == 11 and tree_bytes(a) == tree_bytes(b)
    else:
        assert a.read_bytes() == b.read_bytes()
    assert stats.frames == 11 and stats.first_frame_seconds is not None and stats.tile == (24, 24)
    # called directly: the timeline from caches_ready on (the CLI adds the launch before it)
    assert list(stats.timeline) == list(TIMELINE[TIMELINE.index('caches_ready') :])
    assert stats.timeline['first_frame_written'] == stats.first_frame_at
    assert worker_threads() == []


class FailingNet(InferTestNet):
    """Raises ``error`` at network call ``at`` (after earlier chunks were already written)."""

    def __init__(self, error: BaseException, at: int):
        super().__init__()
        self.error, self.at, self.count = error, at, 0

    def forward(self, lq):
        self.count += 1
        if self.count == self.at:
            raise self.error
        return super().forward(lq)


def test_network_failure_midway_aborts_cleanly(tmp_path):
    src = write_folder(tmp_path / 'in', make_frames(12, 36, 36))
    for out in ('out', 'out.mp4'):
        net = FailingNet(RuntimeError('boom at call 3'), at=3)
        with pytest.raises(RuntimeError, match='boom at call 3'):
            upscale_video(str(src), str(tmp_path / out), net, chunk=3, overlap=0, tile=0, progress=False)
        assert sorted(p.name for p in tmp_path.iterdir()) == ['in']
        assert worker_threads() == []


def test_writer_failure_has_the_sinks_message(tmp_path, monkeypatch):
    src = write_folder(tmp_path / 'in', make_frames(8, 36, 36))
    original = FolderSink.write

    def write(self, rgb: np.ndarray, tag: FrameTag) -> None:
        if tag.index == 5:
            raise OSError(f'{tag.name}.png: cannot write PNG')
        original(self, rgb, tag)

    monkeypatch.setattr(FolderSink, 'write', write)
    with pytest.raises(OSError, match='00005.png: cannot write PNG'):
        upscale_video(str(src), str(tmp_path / 'out'), InferTestNet(), chunk=2, overlap=0, tile=0, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['in']
    assert worker_threads() == []


def test_ctrl_c_midway_leaves_nothing(tmp_path, capsys, test_net_files, monkeypatch):  # noqa: F811
    """KeyboardInterrupt in the main thread while writer and reader threads are busy: exit 130, no output."""
    src = write_video(tmp_path / 'in.mp4', make_frames(10, 36, 40))
    calls = dict(n=0)
    forward = InferTestNet.forward

    def interrupted(self, lq):
        calls['n'] += 1
        if calls['n'] == 3:
            raise KeyboardInterrupt
        return forward(self, lq)

    monkeypatch.setattr(InferTestNet, 'forward', interrupted)
    for out in ('out', 'out.mkv'):
        calls['n'] = 0
        code, err = run_cli(
            capsys,
            str(src),
            '-o',
            str(tmp_path / out),
            '--weights',
            test_net_files['weights'],
            '-opt',
            test_net_files['opt'],
            '--chunk',
            '3',
            '--overlap',
            '1',
            '--tile',
            '0',
        )
        assert code == 130, err
        assert sorted(p.name for p in tmp_path.iterdir()) == ['in.mp4']
        assert worker_threads() == []


def test_stats_json_and_auto_tile_on_cpu(tmp_path, capsys, test_net_files):  # noqa: F811
    import json

    src = write_folder(tmp_path / 'in', make_frames(3, 36, 300))
    code, err = run_cli(
        capsys,
        str(src),
        '-o',
        str(tmp_path / 'out'),
        '--weights',
        test_net_files['weights'],
        '-opt',
        test_net_files['opt'],
        '--stats-json',
        str(tmp_path / 'stats.json'),
    )
    assert code == 0, err
    stats = json.loads((tmp_path / 'stats.json').read_text())
    assert stats['frames'] == 3 and stats['tile'] == [36, 256] and stats['tile_batch'] == 1  # CPU: today's default
    assert stats['first_frame_seconds'] <= stats['seconds'] and stats['peak_device_bytes'] is None
    assert stats['gpu_busy_steady'] is None and stats['steady_chunks'] is None  # measured on CUDA only
    assert stats['precompiled_s'] is None  # compiled blocks run on CUDA only
    assert len(read_video_or_folder(tmp_path / 'out')) == 3
    # the launch timeline: every phase, in order, from the process start (the OS's record on Linux) on
    timeline = stats['timeline']
    assert list(timeline) == list(TIMELINE), timeline
    times = [v for k, v in timeline.items() if k != 'first_frame_written']  # frames leave before the last call
    assert times == sorted(times) and timeline['stream_start'] < timeline['first_frame_written'], timeline
    assert timeline['first_frame_written'] == stats['first_frame_at']
    first = timeline['first_frame_written'] - timeline['stream_start']
    assert first == pytest.approx(stats['first_frame_seconds'], abs=0.01)
    assert stats['process_start_source'] in ('proc', 'psutil', 'gsmsr_import')
    if sys.platform.startswith('linux'):
        assert stats['process_start_source'] == 'proc'
    # the host peak so far at four phases: never falling, the last one the run's peak
    host = stats['host_peak_at']
    assert list(host) == ['caches_ready', 'stream_start', 'first_chunk_queued', 'stream_end'], host
    assert list(host.values()) == sorted(host.values()) and host['stream_end'] == stats['peak_host_bytes']


def read_video_or_folder(path: Path):
    return list(path.iterdir()) if path.is_dir() else read_video(path)[0]


@pytest.mark.parametrize('ext', ['.jpg', '.webp', '.png'])
def test_folder_of_turned_images_reads_at_the_size_it_decodes(tmp_path, ext):
    """An image whose EXIF orientation turns it a quarter (a phone's portrait shot) decodes turned, as OpenCV's
    imread shows it; the header check expects that size instead of refusing the folder."""
    from PIL import Image

    frames = make_frames(2, 36, 40)
    (tmp_path / 'in').mkdir()
    for i, f in enumerate(frames):
        im = Image.fromarray(f)
        exif = im.getexif()
        exif[0x0112] = 6  # rotate 90 degrees clockwise to display
        im.save(tmp_path / 'in' / f'{i}{ext}', exif=exif, quality=95)
    source = open_source(str(tmp_path / 'in'))
    assert (source.info.height, source.info.width) == (40, 36)
    got = [rgb for rgb, _ in source]
    want = cv2.cvtColor(cv2.imread(str(tmp_path / 'in' / f'1{ext}'), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert [g.shape for g in got] == [(40, 36, 3)] * 2 and np.array_equal(got[1], want)


def test_damaged_exif_block_does_not_refuse_the_folder(tmp_path):
    from PIL import Image

    (tmp_path / 'in').mkdir()
    for i, f in enumerate(make_frames(2, 36, 40)):
        Image.fromarray(f).save(tmp_path / 'in' / f'{i}.jpg', exif=b'Exif\x00\x00not a TIFF block', quality=95)
    source = open_source(str(tmp_path / 'in'))
    assert (source.info.height, source.info.width) == (36, 40)
    assert [rgb.shape for rgb, _ in source] == [(36, 40, 3)] * 2
