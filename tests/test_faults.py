"""Fault injection (issue 19): the input is never overwritten, no partial output survives a signal or a full
disk, every failure is one line with the right exit code, option typos and broken checkpoints are named.

Real faults where the machine allows them: symbolic and hard links, signals sent to a real ``python -m gsmsr
infer`` process, a process killed by SIGKILL, truncated checkpoints, an unwritable folder (see
:func:`unwritable_folder`). A full disk is simulated: the PNG writer's ``open`` raises ENOSPC, and video
output is written to ``/dev/full`` (a real ENOSPC from FFmpeg).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import yaml

import gsmsr  # noqa: F401  (compat before BasicSR)

# isort: split
from gsmsr import cli, compat, faults, inference, memory_plan, video_io
from gsmsr.archs import GSMNet
from gsmsr.option_keys import check_option_keys, unknown_option_keys

# isort: split
from test_inference import make_frames, read_folder, read_video, run_cli, write_folder, write_video

from conftest import REPO_ROOT, TINY_NET, make_opt

TINY = {k: v for k, v in TINY_NET.items() if k != 'type'}


@pytest.fixture(scope='module')
def tiny_net(tmp_path_factory):
    """Weights and options of the tiny GSMNet (a registered arch, so a subprocess can build it too)."""
    root = tmp_path_factory.mktemp('tiny')
    torch.manual_seed(0)
    torch.save({'params': GSMNet(**TINY).state_dict()}, root / 'net.pth')
    (root / 'net.yml').write_text(yaml.safe_dump({'network_g': dict(TINY_NET)}))
    return dict(weights=str(root / 'net.pth'), opt=str(root / 'net.yml'), root=root)


def infer(capsys, net, src, out, *extra):
    return run_cli(capsys, str(src), '-o', str(out), '--weights', net['weights'], '-opt', net['opt'], *extra)


def snapshot(folder: Path) -> dict:
    """path -> bytes of every file under ``folder`` (links followed), to prove nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def fail_opening(monkeypatch, mode: str, suffix: str, code: int, after: int = 0) -> None:
    """video_io's ``open`` of files ending in ``suffix`` with ``mode`` ('r' or 'w') raises OSError ``code`` after
    ``after`` such opens succeeded (a full disk, a failing one)."""
    real_open, opened = open, []

    def failing(file, file_mode='r', *args, **kwargs):
        if mode in file_mode and str(file).endswith(suffix):
            if len(opened) >= after:
                raise OSError(code, os.strerror(code), str(file))
            opened.append(file)
        return real_open(file, file_mode, *args, **kwargs)

    monkeypatch.setattr(video_io, 'open', failing, raising=False)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------------------------- 1. the input
def test_links_to_the_input_are_refused_even_with_force(tmp_path, capsys, tiny_net):
    write_folder(tmp_path / 'frames', make_frames(2, 36, 36))
    video = write_video(tmp_path / 'vid.mp4', make_frames(2, 36, 36))
    (tmp_path / 'link').symlink_to('frames')
    (tmp_path / 'link.mp4').symlink_to('vid.mp4')
    os.link(video, tmp_path / 'hard.mp4')
    before = snapshot(tmp_path)
    cases = [
        ('link', 'frames', 'output is the same as the input'),  # the data-losing case of the issue
        ('frames', 'link', 'output is the same as the input'),
        ('link.mp4', 'vid.mp4', 'output is the same as the input'),
        ('vid.mp4', 'link.mp4', 'output is the same as the input'),
        ('hard.mp4', 'vid.mp4', 'output is the same as the input'),  # a hard link: only samefile sees it
        ('frames', '.', 'output folder contains the input'),
        ('vid.mp4', '.', 'output folder contains the input'),
        ('frames', 'frames/sr', 'output is inside the input folder'),
        ('link', 'frames/sr.mp4', 'output is inside the input folder'),
    ]
    for src, out, message in cases:
        code, err = infer(capsys, tiny_net, tmp_path / src, tmp_path / out, '--force')
        assert code == 2 and message in one_line(err), (src, out, err)
        assert snapshot(tmp_path) == before, (src, out)


def test_input_overlap_compares_files(tmp_path):
    (tmp_path / 'a').mkdir()
    (tmp_path / 'b').mkdir()
    assert faults.input_overlap(str(tmp_path / 'b'), str(tmp_path / 'a')) is None
    assert faults.input_overlap(str(tmp_path / 'ab'), str(tmp_path / 'a')) is None  # a prefix is not a parent
    assert faults.input_overlap(str(tmp_path / 'a' / '..' / 'a'), str(tmp_path / 'a')) == 'is the input'
    assert faults.input_overlap(str(tmp_path / 'a' / 'x.mp4'), str(tmp_path / 'a')) == 'is inside the input folder'


# ----------------------------------------------------------------------------------------------- 2. signals
def start_infer(src: Path, out: Path, net: dict) -> subprocess.Popen:
    cmd = [sys.executable, '-m', 'gsmsr', 'infer', str(src), '-o', str(out), '--weights', net['weights']]
    cmd += ['-opt', net['opt'], '--chunk', '2', '--overlap', '0', '--tile', '0', '--no-progress', '--device', 'cpu']
    # Library warnings (torch, BasicSR) would add lines of their own; the one-line promise is gsmsr's.
    path = str(REPO_ROOT) + os.pathsep + os.environ.get('PYTHONPATH', '')
    env = dict(os.environ, PYTHONPATH=path, PYTHONWARNINGS='ignore')
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_partial_frames(folder: Path, proc: subprocess.Popen, timeout: float = 60.0) -> Path:
    """The hidden partial output folder once it holds a frame (the run is then in the middle of writing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        for partial in folder.glob('.out.*.partial'):
            if any(partial.glob('*.png')):
                return partial
        time.sleep(0.02)
    proc.kill()
    raise AssertionError('no partial output appeared')


@pytest.fixture(scope='module')
def long_clip(tmp_path_factory) -> Path:
    """Enough 36x36 frames that the tiny network is still writing when the signal comes."""
    return write_folder(tmp_path_factory.mktemp('long') / 'in', make_frames(300, 36, 36))


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_leaves_nothing_and_exits_128_plus_signal(tmp_path, tiny_net, long_clip, signum):
    proc = start_infer(long_clip, tmp_path / 'out', tiny_net)
    wait_for_partial_frames(tmp_path, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    line = one_line(err)
    assert 'interrupted, no output written' in line and signal.Signals(signum).name in line, err
    assert os.listdir(tmp_path) == []


def test_stale_partial_after_sigkill_is_removed_by_the_next_run(tmp_path, capsys, tiny_net, long_clip):
    proc = start_infer(long_clip, tmp_path / 'out', tiny_net)
    partial = wait_for_partial_frames(tmp_path, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert partial.is_dir()  # SIGKILL cannot be handled: the partial stays
    small = write_folder(tmp_path / 'small', make_frames(2, 36, 36))
    code, err = infer(capsys, tiny_net, small, tmp_path / 'out')
    assert code == 0, err
    assert f'note: removed {partial}' in err
    assert sorted(os.listdir(tmp_path)) == ['out', 'small'] and len(read_folder(tmp_path / 'out')) == 2


def test_partial_of_a_live_run_is_refused_and_kept(tmp_path, capsys, tiny_net):
    src = write_folder(tmp_path / 'in', make_frames(2, 36, 36))
    live = tmp_path / '.out.mp4.12345.abcdefgh.partial.mp4'
    live.write_bytes(b'being written')
    other = tmp_path / '.out.12345.abcdefgh.partial'  # another output's partial: never touched
    other.mkdir()
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as the writing process holds it
    try:
        code, err = infer(capsys, tiny_net, src, tmp_path / 'out.mp4')
    finally:
        os.close(fd)
    assert code == 2 and 'another running process (pid 12345) is writing this output' in one_line(err)
    assert live.read_bytes() == b'being written' and other.is_dir()
    # The input is never removed, even when its name looks like a partial of the output.
    code, err = infer(capsys, tiny_net, other, tmp_path / 'out', '--chunk', '2')
    assert code == 2 and other.is_dir()


# ----------------------------------------------------------------------------------------------- 3. environment
def test_full_disk_png_is_one_line_and_leaves_nothing(tmp_path, capsys, tiny_net, monkeypatch):
    src = write_folder(tmp_path / 'in', make_frames(4, 36, 36))
    fail_opening(monkeypatch, 'w', '.png', errno.ENOSPC, after=1)  # the second frame finds the disk full
    code, err = infer(capsys, tiny_net, src, tmp_path / 'out', '--chunk', '2', '--overlap', '0')
    assert code == 1, err
    assert one_line(err) == f'gsmsr infer: error: {tmp_path / "out"}: cannot write (no space left on device)'
    assert os.listdir(tmp_path) == ['in']


def test_full_disk_video_is_one_line_and_leaves_nothing(tmp_path, capsys, tiny_net, monkeypatch):
    src = write_folder(tmp_path / 'in', make_frames(4, 36, 36))
    import av  # the module video_io imports on the first video file

    real_open = av.open

    def to_dev_full(file, mode='r', **kwargs):  # the encoder's bytes go to a device that is always full
        if mode == 'w':
            return real_open('/dev/full', 'w', format='matroska', **kwargs)
        return real_open(file, mode, **kwargs)

    monkeypatch.setattr(av, 'open', to_dev_full)
    code, err = infer(capsys, tiny_net, src, tmp_path / 'out.mkv', '--chunk', '2', '--overlap', '0')
    assert code == 1, err
    assert 'out.mkv: cannot write (no space left on device)' in one_line(err)
    assert os.listdir(tmp_path) == ['in']


def test_out_of_gpu_memory_names_the_plan_and_leaves_nothing(tmp_path, capsys, tiny_net, monkeypatch):
    src = write_folder(tmp_path / 'in', make_frames(4, 36, 36))
    real_call = inference._network_call

    def oom_call(*args, **kwargs):
        call = real_call(*args, **kwargs)

        def second_chunk_fails(lq, *rest, **kw):  # the first chunk's frames are written, then the device is full
            if second_chunk_fails.calls:
                raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 4.00 GiB')
            second_chunk_fails.calls += 1
            return call(lq, *rest, **kw)

        second_chunk_fails.calls = 0
        return second_chunk_fails

    monkeypatch.setattr(inference, '_network_call', oom_call)
    code, err = infer(
        capsys, tiny_net, src, tmp_path / 'out', '--chunk', '2', '--overlap', '0', '--tile', '32', '--tile-overlap', '8'
    )
    assert code == 1, err
    line = one_line(err)
    assert line.startswith('gsmsr infer: error: out of GPU memory (36x36 frames in tiles of 32x32, 1 a call, ')
    assert 'chunks of 2 frames, fp32, SWSA over slabs); lower --chunk and/or --tile.' in line, line
    assert line.endswith('PyTorch: CUDA out of memory. Tried to allocate 4.00 GiB'), line
    assert os.listdir(tmp_path) == ['in']


def test_out_of_gpu_memory_with_a_planned_tiling_starts_again_with_smaller_tiles(
    tmp_path, capsys, tiny_net, monkeypatch
):
    """A tiling planned from the free memory that runs out of it before the first frame: planned again for half the
    memory, and the output is what that tiling gives when asked for."""
    src = write_folder(tmp_path / 'in', make_frames(2, 40, 100))
    whole = memory_plan.estimate_peak_bytes((40, 100), 1, 40, 100, 2, 4, 'fp32', compiled=False)
    free = int(whole / memory_plan.HEADROOM) + 1  # the whole frame just fits; with half of it, tiles
    small, _ = memory_plan.choose_tiling(free // 2, 40, 100, 2, 4, 32, 'fp32', compiled=False)
    assert memory_plan.choose_tiling(free, 40, 100, 2, 4, 32, 'fp32', compiled=False)[0] == (40, 100)
    assert small == (40, 64)
    monkeypatch.setattr(inference, 'free_device_bytes', lambda device: free)
    real_call, sides = inference._network_call, []

    def whole_frames_fail(*args, **kwargs):
        call = real_call(*args, **kwargs)

        def run(lq):
            sides.append(tuple(lq.shape[-2:]))
            if lq.shape[-1] == 100:
                raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
            return call(lq)

        return run

    monkeypatch.setattr(inference, '_network_call', whole_frames_fail)
    code, err = infer(capsys, tiny_net, src, tmp_path / 'out')
    assert code == 0, err
    retry = err.splitlines()[0]
    assert retry.startswith('gsmsr infer: out of GPU memory (40x100 frames in tiles of 40x100, 1 a call, chunks of 2')
    assert retry.endswith('; starting again, tiled for 50% of it'), retry
    assert sides[0] == (40, 100) and set(sides[1:]) == {small}
    monkeypatch.setattr(inference, '_network_call', real_call)
    code, err = infer(capsys, tiny_net, src, tmp_path / 'want', '--tile', '64')
    assert code == 0, err
    assert all(np.array_equal(a, b) for a, b in zip(read_folder(tmp_path / 'out'), read_folder(tmp_path / 'want')))
    assert len(read_folder(tmp_path / 'out')) == 2


def test_out_of_gpu_memory_with_a_given_tile_is_not_retried(tmp_path, capsys, tiny_net, monkeypatch):
    src = write_folder(tmp_path / 'in', make_frames(2, 36, 36))
    monkeypatch.setattr(inference, 'free_device_bytes', lambda device: 2**40)
    calls = []

    def always_fails(*args, **kwargs):
        def run(lq):
            calls.append(1)
            raise torch.cuda.OutOfMemoryError('CUDA out of memory.')

        return run

    monkeypatch.setattr(inference, '_network_call', always_fails)
    code, err = infer(capsys, tiny_net, src, tmp_path / 'out', '--tile', '64')
    assert code == 1 and len(calls) == 1 and 'lower --chunk and/or --tile' in one_line(err)
    calls.clear()  # planned, but it keeps failing: the first plan and MEMORY_RETRIES more, then the error
    code, err = infer(capsys, tiny_net, src, tmp_path / 'out')
    assert code == 1 and len(calls) == 1 + inference.MEMORY_RETRIES, err
    assert err.strip().splitlines()[-1].startswith('gsmsr infer: error: out of GPU memory (36x36 frames')
    assert os.listdir(tmp_path) == ['in']


def test_infer_asks_for_expandable_segments_unless_the_user_set_the_allocator(monkeypatch, capsys):
    for name in cli.ALLOC_CONF_VARS:
        monkeypatch.setenv(name, '')  # unset, and restored after the test
    with pytest.raises(SystemExit):
        cli.main(['infer', '--help'])
    assert os.environ['PYTORCH_CUDA_ALLOC_CONF'] == 'expandable_segments:True'
    monkeypatch.setenv('PYTORCH_CUDA_ALLOC_CONF', '')
    monkeypatch.setenv('PYTORCH_ALLOC_CONF', 'max_split_size_mb:512')
    with pytest.raises(SystemExit):
        cli.main(['infer', '--help'])
    assert os.environ['PYTORCH_CUDA_ALLOC_CONF'] == '' and os.environ['PYTORCH_ALLOC_CONF'] == 'max_split_size_mb:512'
    capsys.readouterr()


def test_free_space_is_checked_before_the_network_loads(tmp_path, capsys, tiny_net, monkeypatch):
    src = write_folder(tmp_path / 'in', make_frames(3, 36, 36))
    usage = faults.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(faults.shutil, 'disk_usage', lambda p: usage._replace(free=100_000))
    monkeypatch.setattr(inference, 'load_network', lambda *a: pytest.fail('network loaded before the check'))
    code, err = infer(capsys, tiny_net, src, tmp_path / 'out')
    # 3 frames of 144x144 RGB: 186,624 bytes > 100,000 free; as video a tenth of that fits.
    assert code == 1 and 'out: not enough free space (no space left on device)' in one_line(err), err
    assert os.listdir(tmp_path) == ['in']


def unwritable_folder(tmp_path: Path) -> str:
    """A folder this process cannot create files in: a chmod 0o555 folder, or for root (who ignores permission
    bits) /sys, read-only for everyone in containers and refusing new files on any Linux."""
    folder = tmp_path / 'readonly'
    folder.mkdir()
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):  # not root: the permission bits hold
        return str(folder)
    folder.chmod(0o755)
    if not os.path.isdir('/sys'):
        pytest.skip('running as root without /sys: no unwritable folder to test with')
    return '/sys'


def test_unwritable_folder_is_found_before_the_network_loads(tmp_path, capsys, tiny_net, monkeypatch):
    src = write_folder(tmp_path / 'in', make_frames(2, 36, 36))
    folder = unwritable_folder(tmp_path)
    monkeypatch.setattr(inference, 'load_network', lambda *a: pytest.fail('network loaded before the check'))
    for out in ('frames', 'out.mp4'):
        code, err = infer(capsys, tiny_net, src, os.path.join(folder, out))
        assert code == 1 and f'cannot write to folder {folder}' in one_line(err), err  # the environment
    # A parent that is a file (ENOTDIR), also refused up front.
    (tmp_path / 'file').write_text('a file, not a folder')
    code, err = infer(capsys, tiny_net, src, tmp_path / 'file' / 'out')
    assert code == 2 and 'parent folder' in one_line(err)


def test_tracebacks_only_with_debug(tmp_path, capsys, tiny_net, monkeypatch):
    src = write_folder(tmp_path / 'in', make_frames(2, 36, 36))

    def broken(*args, **kwargs):
        raise RuntimeError('something inside broke')

    monkeypatch.setattr(inference, 'upscale_video', broken)
    code, err = infer(capsys, tiny_net, src, tmp_path / 'out')
    assert code == 1 and 'unexpected error: RuntimeError: something inside broke (--debug' in one_line(err)
    monkeypatch.setenv('GSMSR_DEBUG', '1')
    code, err = infer(capsys, tiny_net, src, tmp_path / 'out')
    assert code == 1 and 'Traceback' in err and err.strip().endswith('something inside broke')
    monkeypatch.delenv('GSMSR_DEBUG')
    argv = ['infer', str(src), '-o', str(tmp_path / 'out'), '--weights', tiny_net['weights'], '-opt', tiny_net['opt']]
    code = cli.main([*argv, '--debug'])
    assert code == 1 and 'Traceback' in capsys.readouterr().err


def test_unreadable_frame_mid_run_is_the_environment_and_leaves_nothing(tmp_path, capsys, tiny_net, monkeypatch):
    """A frame file that cannot be read (EIO) after the headers were checked: exit 1 naming the file, not 'cannot
    decode image' (bad input, exit 2); no output left."""
    src = write_folder(tmp_path / 'in', make_frames(4, 36, 36))
    fail_opening(monkeypatch, 'r', '00002.png', errno.EIO)
    code, err = infer(capsys, tiny_net, src, tmp_path / 'out', '--chunk', '2', '--overlap', '0')
    assert code == 1, err
    assert one_line(err) == f'gsmsr infer: error: {src / "00002.png"}: input/output error'
    assert os.listdir(tmp_path) == ['in']


def test_video_read_error_is_the_environment(tmp_path, monkeypatch):
    """FFmpeg's errno errors while decoding or opening (EIO) are the environment (FaultError, exit 1); its data errors
    bad input (InputError, exit 2); both name the file (and the frame)."""
    import av

    path = write_video(tmp_path / 'in.mp4', make_frames(3, 36, 36))

    class Failing:  # the real container's first frame, then the error
        def __init__(self, container, code: int) -> None:
            self.container, self.code = container, code

        def decode(self, stream):
            yield next(self.container.decode(stream))
            av.error.err_check(-self.code)

        def close(self) -> None:
            self.container.close()

    for code, kind, message in [
        (errno.EIO, faults.FaultError, 'reading failed at frame 1 (input/output error)'),
        (errno.EINVAL, faults.InputError, 'decoding failed at frame 1'),
    ]:
        source = video_io.open_source(str(path))
        source.container = Failing(source.container, code)
        with pytest.raises(kind, match=f'in.mp4: {re.escape(message)}'):
            list(source)
        source.close()

    def failing_open(file, *args, **kwargs):  # the same when the container is opened
        av.error.err_check(-errno.EIO)

    monkeypatch.setattr(av, 'open', failing_open)
    with pytest.raises(faults.FaultError, match=re.escape('in.mp4: reading failed (input/output error)')):
        video_io.open_source(str(path))


def test_small_faults_are_one_line(tmp_path, capsys, tiny_net):
    src = write_folder(tmp_path / 'in', make_frames(2, 36, 36))
    sd = GSMNet(**TINY).state_dict()
    sd['conv_first.weight'] = 'not a tensor'
    torch.save({'params': sd}, tmp_path / 'odd.pth')
    cases = [
        (['--weights', str(tmp_path / 'odd.pth')], "odd.pth: entry 'conv_first.weight' is a str, not a tensor"),
        (['--fps', 'inf'], '--fps inf: must be between'),
        (['--fps', '1e-9'], '--fps 1e-09: must be between'),
        (['--fps', 'nan'], '--fps nan: must be between'),
    ]
    for argv, message in cases:
        args = ['--weights', tiny_net['weights'], '-opt', tiny_net['opt'], *argv]
        code, err = run_cli(capsys, str(src), '-o', str(tmp_path / 'out.mp4'), *args)
        assert code == 2 and message in one_line(err), (argv, err)
    code, err = infer(capsys, tiny_net, src, tmp_path / 'out.mp4', '--fps', '0.5')
    assert code == 0 and read_video(tmp_path / 'out.mp4')[1] == 0.5


def test_make_lmdb_faults_are_one_line(tmp_path, capsys, monkeypatch):
    code = cli.main(['make-lmdb', 'reds', '--root', str(tmp_path / 'nope')])
    assert code == 2 and 'REDS GT folder not found' in one_line(capsys.readouterr().err)
    gt, lq = tmp_path / 'REDS' / 'train_sharp' / '000', tmp_path / 'REDS' / 'train_sharp_bicubic' / 'X4' / '000'
    write_folder(gt, make_frames(2, 16, 16), names=['00000000', '00000001'])
    write_folder(lq, make_frames(2, 4, 4), names=['00000000', '00000001'])
    import lmdb
    from basicsr.utils import lmdb_util

    def full(*args, **kwargs):
        raise lmdb.Error('mdb_txn_commit: No space left on device')

    monkeypatch.setattr(lmdb_util.LmdbMaker, 'put', full)
    code = cli.main(['make-lmdb', 'reds', '--root', str(tmp_path / 'REDS'), '--workers', '1'])
    line = one_line(capsys.readouterr().err)
    assert code == 1 and 'train_sharp_with_val.lmdb: cannot write LMDB' in line and 'No space left' in line
    assert sorted(os.listdir(tmp_path / 'REDS')) == ['train_sharp', 'train_sharp_bicubic']


# ----------------------------------------------------------------------------------------------- 4. options
@pytest.mark.parametrize('path', sorted((REPO_ROOT / 'options').rglob('*.yml')), ids=lambda p: p.name)
def test_shipped_option_files_have_only_known_keys(path):
    from basicsr.utils.options import ordered_yaml

    with open(path, encoding='utf-8') as f:
        assert unknown_option_keys(yaml.load(f, Loader=ordered_yaml()[0])) == []


def minimal_train_options(**train) -> dict:
    return dict(
        name='typo',
        model_type='GSMModel',
        scale=4,
        num_gpu=0,
        datasets={},
        network_g=dict(TINY_NET),
        path=dict(pretrain_network_g=None, strict_load_g=True, resume_state=None),
        train=dict(ema_decay=0.9, total_iter=2, **train),
    )


def test_misspelled_option_keys_are_named(tmp_path, capsys, monkeypatch):
    opt = minimal_train_options(ema_decy=0.999, fix_flwo=1000)
    opt['network_g']['embed_dim'] = 8
    opt['val'] = dict(val_freq=2, tile_overlapp=4)
    opt['path']['pretrain_network_d'] = None  # a path key of a network that does not exist
    problems = unknown_option_keys(opt)
    assert problems == [
        'train.ema_decy: unknown; did you mean ema_decay?',
        'train.fix_flwo: unknown; did you mean fix_flow?',
        'val.tile_overlapp: unknown; did you mean tile_overlap?',
        'path.pretrain_network_d: unknown; did you mean pretrain_network_g?',
        'network_g.embed_dim: unknown; did you mean embed_dims?',
    ]
    opt['allow_unknown_keys'] = True
    check_option_keys(opt, 'x.yml')
    assert 'warning: x.yml: train.ema_decy: unknown' in capsys.readouterr().err
    # Through the real command: exit 2, one line, nothing created.
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'train.yml').write_text(yaml.safe_dump(minimal_train_options(ema_decy=0.999)))
    code = cli.main(['train', '-opt', 'train.yml'])
    line = one_line(capsys.readouterr().err)
    assert code == 2 and 'train.yml: train.ema_decy: unknown; did you mean ema_decay?' in line
    assert 'allow_unknown_keys: true' in line and os.listdir(tmp_path) == ['train.yml']
    assert cli.main(['test', '-opt', 'missing.yml']) == 2
    assert 'missing.yml: no such options file' in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- 5. auto_resume
def resume_experiment(tmp_path: Path, iters) -> dict:
    """training_states/<it>.state and models/net_g_<it>.pth for each iteration, and the options naming them."""
    states, models = tmp_path / 'training_states', tmp_path / 'models'
    states.mkdir()
    models.mkdir()
    for it in iters:
        torch.save({'epoch': 0, 'iter': it, 'optimizers': [], 'schedulers': []}, states / f'{it}.state')
        torch.save({'params': {'w': torch.full((2,), float(it))}}, models / f'net_g_{it}.pth')
    return {
        'auto_resume': True,
        'network_g': {},
        'path': {'training_states': str(states), 'models': str(models), 'resume_state': None},
    }


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_auto_resume_falls_back_past_broken_files_and_keeps_them(tmp_path, capsys):
    opt = resume_experiment(tmp_path, (2, 4, 6))
    models, states = tmp_path / 'models', tmp_path / 'training_states'
    truncate(models / 'net_g_6.pth')
    truncate(states / '4.state')
    before = sorted(os.listdir(models)) + sorted(os.listdir(states))
    compat.take_resume_notes()
    state = compat.load_resume_state(opt)
    assert state['iter'] == 2 and opt['path']['resume_state'] == str(states / '2.state')
    assert opt['path']['pretrain_network_g'] == str(models / 'net_g_2.pth')
    notes = compat.take_resume_notes()
    assert any(f'{models / "net_g_6.pth"}: cannot read model checkpoint' in n for n in notes), notes
    assert any(f'{states / "4.state"}: cannot read training state' in n for n in notes), notes
    assert 'resuming from iteration 2' in notes[-1] and 'skipped: 6, 4' in notes[-1]
    err = capsys.readouterr().err
    assert all(f'warning: {n}' in err for n in notes)
    assert sorted(os.listdir(models)) + sorted(os.listdir(states)) == before  # nothing deleted

    truncate(states / '2.state')
    opt['path']['resume_state'] = None
    with pytest.raises(faults.InputError, match='no iteration in .* has a training state and models that load'):
        compat.load_resume_state(opt)


def test_gsm_model_names_an_unreadable_checkpoint(tmp_path):
    from basicsr.models import build_model

    model = build_model(make_opt(tmp_path, is_train=False))
    path = tmp_path / 'net_g_4.pth'
    torch.save({'params': model.net_g.state_dict()}, path)
    truncate(path)
    with pytest.raises(faults.InputError, match=f'{path}: cannot read checkpoint'):
        model.load_network(model.net_g, str(path))


# ----------------------------------------------------------------------------------------------- 6. side outputs
def test_stats_json_never_replaces_the_input_or_the_output(tmp_path, capsys, tiny_net, monkeypatch):
    video = write_video(tmp_path / 'vid.mp4', make_frames(2, 36, 36))
    frames = write_folder(tmp_path / 'frames', make_frames(2, 36, 36))
    (tmp_path / 'link').symlink_to('frames')
    before = snapshot(tmp_path)
    monkeypatch.setattr(inference, 'load_network', lambda *a: pytest.fail('network loaded before the check'))
    cases = [
        (video, tmp_path / 'out', video),  # a slip of the keyboard: the whole run, then the input is gone
        (frames, tmp_path / 'out', next(frames.glob('*.png'))),
        (frames, tmp_path / 'out', tmp_path / 'link' / 'stats.json'),  # into the input folder, through a link
        (frames, tmp_path / 'out.mp4', tmp_path / 'out.mp4'),  # the output just written
    ]
    for src, out, stats in cases:
        code, err = infer(capsys, tiny_net, src, out, '--stats-json', str(stats))
        assert code == 2 and f'--stats-json {stats}' in one_line(err), (stats, err)
        assert snapshot(tmp_path) == before, stats


def test_stats_json_that_cannot_be_written_is_refused_before_the_network_loads(tmp_path, capsys, tiny_net, monkeypatch):
    src = write_folder(tmp_path / 'in', make_frames(2, 36, 36))
    locked = tmp_path / 'locked'
    locked.mkdir()
    monkeypatch.setattr(inference, 'load_network', lambda *a: pytest.fail('network loaded before the check'))
    real_mkstemp = faults.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # a read-only folder, as root sees one on a read-only file system
        if dir is not None and Path(dir) == locked:
            raise PermissionError(errno.EACCES, 'Permission denied', dir)
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(faults.tempfile, 'mkstemp', mkstemp)
    for stats, why, expected in [
        (tmp_path / 'in', 'is the input', 2),  # checked first: the input folder itself
        (locked, 'is a folder', 2),
        (locked / 'stats.json', f'cannot write to folder {locked}', 1),  # the environment
        (locked / 'new' / 'deeper' / 'stats.json', f'cannot write to folder {locked}', 1),  # created by the write
    ]:
        code, err = infer(capsys, tiny_net, src, tmp_path / 'out', '--stats-json', str(stats))
        assert code == expected and one_line(err).startswith(f'gsmsr infer: error: --stats-json {stats}: '), err
        assert why in one_line(err), err
    assert sorted(os.listdir(tmp_path)) == ['in', 'locked'] and os.listdir(locked) == []


def test_full_disk_in_an_atomic_write_names_the_file_and_leaves_nothing(tmp_path, capsys, tiny_net, monkeypatch):
    from gsmsr import utils

    src = write_folder(tmp_path / 'in', make_frames(2, 36, 36))
    real_open = open

    def to_dev_full(file, mode='r', *args, **kwargs):  # a real ENOSPC from the kernel, as a full disk gives it
        if 'w' in mode:
            return real_open('/dev/full', mode, *args, **kwargs)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(utils, 'open', to_dev_full, raising=False)
    stats = tmp_path / 'stats.json'
    code, err = infer(capsys, tiny_net, src, tmp_path / 'out', '--stats-json', str(stats))
    assert code == 1 and err.strip().splitlines()[-1] == f'gsmsr infer: error: {stats}: no space left on device'
    assert sorted(os.listdir(tmp_path)) == ['in', 'out']  # the frames are written, no temporary file is left


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past ``limit`` bytes of any file fail in the kernel (EFBIG), as writes to a full disk do (ENOSPC),
    in every writer (torch's C++ one too); SIGXFSZ is ignored so that the write fails instead of the process."""
    import resource

    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)


def test_checkpoint_write_error_names_the_file_and_leaves_nothing(tmp_path, capsys):
    from gsmsr.models.gsm_model import GSMModel

    path = tmp_path / 'models' / 'net_g_4.pth'
    save = lambda: GSMModel._save_with_retry({'params': {'w': torch.zeros(2**18)}}, str(path), attempts=1)  # noqa: E731
    with file_size_limit(2**16):
        code = faults.run_reporting_errors('basicsr train', save)
    err = capsys.readouterr().err
    assert code == 1 and one_line(err) == f'basicsr train: error: {path}: file too large', err
    assert os.listdir(path.parent) == []


def test_make_lmdb_meta_file_write_error_names_it_and_leaves_nothing(tmp_path, capsys):
    entries = ''.join(f'{clip:05d}/{seq:04d}\n' for clip in range(1, 41) for seq in range(1, 101))
    (tmp_path / 'sep_trainlist.txt').write_text(entries)  # 4,000 meta-info lines, 100 kB
    out = tmp_path / 'meta.txt'
    with file_size_limit(2**16):
        code = cli.main(['make-lmdb', 'vimeo-meta', '--list', str(tmp_path / 'sep_trainlist.txt'), '--out', str(out)])
    line = one_line(capsys.readouterr().err)
    assert code == 1 and line == f'gsmsr make-lmdb: error: {out}: file too large', line
    assert os.listdir(tmp_path) == ['sep_trainlist.txt']


@pytest.mark.parametrize('command', ['infer', 'demo', 'make-lmdb', 'stress-flow'])
def test_every_subcommand_honours_debug(tmp_path, capsys, command):
    bad = {  # an argument each command refuses before any work
        'infer': [str(tmp_path / 'missing'), '-o', str(tmp_path / 'out')],
        'demo': ['--iters', '0'],
        'make-lmdb': ['reds', '--root', str(tmp_path / 'missing')],
        'stress-flow': ['--gt', 'gt', '--lq', 'lq', '--out', 'out', '--noise', '', '--dropout', ''],
    }[command]
    assert cli.main([command, *bad]) == 2 and 'Traceback' not in capsys.readouterr().err
    code, err = cli.main([command, *bad, '--debug']), capsys.readouterr().err
    assert code == 2 and 'Traceback' in err and err.strip().splitlines()[-1].startswith(f'gsmsr {command}: error:'), err


def test_signal_while_force_removes_the_old_frames_leaves_no_folder_behind(tmp_path, capsys, tiny_net, monkeypatch):
    src = write_folder(tmp_path / 'in', make_frames(2, 36, 36))
    write_folder(tmp_path / 'out', make_frames(3, 16, 16))  # the frames of an earlier run, replaced with --force
    real_rmtree, signalled = video_io.shutil.rmtree, []

    def rmtree(path, *args, **kwargs):  # SIGTERM comes as the commit deletes the old frames
        if not signalled and not kwargs.get('ignore_errors'):
            signalled.append(path)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(video_io.shutil, 'rmtree', rmtree)
    code, err = infer(capsys, tiny_net, src, tmp_path / 'out', '--force')
    assert code == 128 + signal.SIGTERM and signalled, err
    assert sorted(os.listdir(tmp_path)) == ['in', 'out'] and len(read_folder(tmp_path / 'out')) == 2
    # the new frames were in place: the message does not say that nothing was written
    assert one_line(err) == f'gsmsr infer: interrupted after {tmp_path / "out"} was complete (SIGTERM)'


def test_failed_force_swap_puts_the_old_frames_back(tmp_path, capsys, tiny_net, monkeypatch):
    """--force over a PNG folder: if the new frames cannot be moved into place after the old ones were moved aside,
    the old ones go back, and nothing else is left."""
    src = write_folder(tmp_path / 'in', make_frames(2, 36, 36))
    write_folder(tmp_path / 'out', make_frames(3, 16, 16))
    before = snapshot(tmp_path / 'out')
    real_replace = video_io.os.replace

    def replace(a, b):  # the second move of the swap (the new frames into place) fails
        if os.path.basename(a).endswith('.partial') and os.path.basename(b) == 'out':
            raise OSError(errno.EXDEV, 'Invalid cross-device link')
        return real_replace(a, b)

    monkeypatch.setattr(video_io.os, 'replace', replace)
    code, err = infer(capsys, tiny_net, src, tmp_path / 'out', '--force')
    assert code == 1 and str(tmp_path / 'out') in one_line(err), err
    assert sorted(os.listdir(tmp_path)) == ['in', 'out'] and snapshot(tmp_path / 'out') == before


def test_old_frames_left_by_a_killed_force_swap_are_removed_by_the_next_run(tmp_path, capsys, tiny_net, monkeypatch):
    """A run killed (SIGKILL) while deleting the replaced frames leaves them in a stale partial of the output, which
    the next run for the same output removes."""
    src = write_folder(tmp_path / 'in', make_frames(2, 36, 36))
    write_folder(tmp_path / 'out', make_frames(3, 16, 16))

    def killed(path, *args, **kwargs):  # the process dies before deleting anything
        if not kwargs.get('ignore_errors'):
            raise SystemExit('killed')

    monkeypatch.setattr(video_io.shutil, 'rmtree', killed)
    sink = video_io.FolderSink(str(tmp_path / 'out'))
    with pytest.raises(SystemExit):
        sink.commit()
    sink._release()  # what the process's death does to its lock
    monkeypatch.undo()
    (left,) = [n for n in os.listdir(tmp_path) if n not in ('in', 'out')]
    assert left.startswith('.out.') and left.endswith('.partial')
    code, err = infer(capsys, tiny_net, src, tmp_path / 'out', '--force')
    assert code == 0 and f'removed {tmp_path / left}' in err, err
    assert sorted(os.listdir(tmp_path)) == ['in', 'out'] and len(read_folder(tmp_path / 'out')) == 2


def test_outputs_sync_the_data_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """atomic_write, a video output and a PNG folder: without the syncs a power cut after the rename can leave the new
    name on an empty file (ext4, XFS)."""
    from gsmsr import utils

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(('fsync', os.readlink(f'/proc/self/fd/{fd}')))
        return real_fsync(fd)

    def replace(a, b):
        events.append(('replace', str(b)))
        return real_replace(a, b)

    monkeypatch.setattr(utils.os, 'fsync', fsync)
    monkeypatch.setattr(utils.os, 'replace', replace)
    utils.atomic_write_text(tmp_path / 'stats.json', '{}')
    (synced_file, renamed, synced_folder) = events
    assert synced_file[0] == 'fsync' and os.path.basename(synced_file[1]).startswith('.stats.json.')
    assert renamed == ('replace', str(tmp_path / 'stats.json'))
    assert synced_folder == ('fsync', str(tmp_path))
    assert (tmp_path / 'stats.json').read_text() == '{}'

    events.clear()
    sink = video_io.open_sink(str(tmp_path / 'out.mkv'), 16, 16)
    sink.write(np.zeros((16, 16, 3), np.uint8), video_io.FrameTag(0, None, '0'))
    sink.commit()
    assert [e[0] for e in events] == ['fsync', 'replace', 'fsync'] and events[2][1] == str(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ['out.mkv', 'stats.json']

    events.clear()  # a PNG folder: each frame's data, the folder's names, the rename, then its parent
    sink = video_io.open_sink(str(tmp_path / 'frames'), 16, 16)
    for i in range(2):
        sink.write(np.zeros((16, 16, 3), np.uint8), video_io.FrameTag(i, None, str(i)))
    tmp = sink.tmp
    sink.commit()
    assert events == [
        ('fsync', os.path.join(tmp, '0.png')),
        ('fsync', os.path.join(tmp, '1.png')),
        ('fsync', tmp),
        ('replace', str(tmp_path / 'frames')),
        ('fsync', str(tmp_path)),
    ]
