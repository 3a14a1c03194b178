"""gsmsr.ops.triton_jit's launch wrapper and compile-ahead mode, and the window step it runs ahead (CPU).

The compilations themselves need a GPU: tests/gpu/test_compile_ahead_gpu.py checks that a window step after
``GSMNet.compile_kernels_ahead`` compiles no kernel of its own and gives the same output.
"""

from __future__ import annotations

import threading

import pytest
import torch

from gsmsr import GSMNet
from gsmsr.archs.gsm_block import GSMBlock
from gsmsr.ops import triton_jit
from gsmsr.ops.triton_jit import Kernel, compile_ahead


class _FakeJit:
    """Records launches and warm-ups the way a JIT function receives them."""

    def __init__(self) -> None:
        self.calls = []
        self.signature = 'sig'

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(('launch', grid, args, kwargs))

    def warmup(self, *args, grid, **kwargs):
        self.calls.append(('warmup', grid, args, kwargs))


def test_kernel_launches_and_delegates():
    jit = _FakeJit()
    kernel = Kernel(jit)
    kernel[(2, 1)](1, 'x', BLOCK=4)
    assert jit.calls == [('launch', (2, 1), (1, 'x'), {'BLOCK': 4})]
    assert kernel.signature == 'sig' and kernel.jit is jit
    import copy

    assert copy.copy(kernel).jit is jit  # made without __init__: no recursion through __getattr__


def test_launches_inside_compile_ahead_only_compile(monkeypatch):
    """Inside the block a launch is a warm-up of the same specialisation (same arguments and grid); after it, a
    launch again. Without Triton's asynchronous compilation the block says so and launches stay launches."""
    pytest.importorskip('triton')
    jit = _FakeJit()
    kernel = Kernel(jit)
    with compile_ahead() as started:
        kernel[(3,)](7, BLOCK=8)
    if started:
        assert jit.calls == [('warmup', (3,), (7,), {'BLOCK': 8})]
    else:  # Triton without triton.runtime._async_compile
        assert jit.calls == [('launch', (3,), (7,), {'BLOCK': 8})]
    kernel[(3,)](7, BLOCK=8)
    assert jit.calls[-1][0] == 'launch' and not triton_jit._AHEAD.get()

    from triton.runtime import _async_compile

    with compile_ahead() as started:
        assert not started or _async_compile.active_mode.get() is not None
        other = []  # another thread's launches run: the mode is this thread's
        thread = threading.Thread(target=lambda: other.append(kernel[(5,)](1)))
        thread.start()
        thread.join()
        assert jit.calls[-1] == ('launch', (5,), (1,), {})
    assert _async_compile.active_mode.get() is None  # nothing left on: later compilations are Triton's usual ones
    monkeypatch.delattr(_async_compile, 'AsyncCompileMode')
    with compile_ahead() as started:
        kernel[(1,)](0)
    assert not started and jit.calls[-1][0] == 'launch'


def test_launch_after_compile_ahead_waits_for_its_compilations():
    """A launch after the block first waits for the compilations the block started and finalises them (Triton 3.6
    puts an asynchronous compilation in the JIT function's cache only then); a failed one is left to the launch."""
    pytest.importorskip('triton')
    from concurrent.futures import Future

    from triton.runtime._async_compile import FutureKernel

    cache = {}
    futures = [Future(), Future()]

    class _AsyncJit(_FakeJit):
        def warmup(self, *args, grid, **kwargs):
            super().warmup(*args, grid=grid, **kwargs)
            return FutureKernel(lambda kernel: cache.__setitem__(grid, kernel), futures[len(self.calls) - 1])

    jit = _AsyncJit()
    kernel = Kernel(jit)
    with compile_ahead() as started:
        if not started:
            pytest.skip('Triton without asynchronous compilation')
        kernel[(1,)](0)
        kernel[(2,)](1)
    assert cache == {} and len(kernel._pending) == 2
    futures[0].set_result('compiled')
    futures[1].set_exception(RuntimeError('bad kernel'))
    kernel[(1,)](0)
    assert cache == {(1,): 'compiled'} and kernel._pending == [] and jit.calls[-1][0] == 'launch'


def test_compile_kernels_ahead_is_off_on_cpu():
    net = GSMNet(prop_depth=1, attn_depth=1, pa_frame=1, embed_dims=16, num_heads=4)
    assert net.compile_kernels_ahead((1, 4, 3, 40, 48)) is False


def test_window_step_once_is_the_streaming_step(monkeypatch):
    """What compile_kernels_ahead runs: one eager window step of the first layer, on a window laid out as the
    streaming sweep lays it out (slots 1..K of a buffer, the result written into another), in the window dtype of
    the streaming sweep; its result equals the same step on a plain copy of that window."""
    torch.manual_seed(0)
    net = GSMNet(prop_depth=2, attn_depth=1, pa_frame=1, embed_dims=16, num_heads=4).eval()
    seen = []
    forward = GSMBlock.forward

    def spy(self, x, gather, scatter, align, out=None):
        seen.append((self, x.shape, x.dtype, x.stride(), out is not None and out.shape == x.shape))
        return forward(self, x, gather, scatter, align, out=out)

    monkeypatch.setattr(GSMBlock, 'forward', spy)
    got = net.window_step_once((2, 6, 3, 40, 48))
    assert len(seen) == 1
    block, shape, dtype, stride, wrote_out = seen[0]
    assert block is net.prop_layers[0].stage.mamba_block and shape == (2, 16, 3, 40, 48) and dtype == torch.float32
    assert stride == (16 * 4 * 40 * 48, 4 * 40 * 48, 40 * 48, 48, 1) and wrote_out  # a slot view of a K+1 buffer
    monkeypatch.setattr(GSMBlock, 'forward', forward)
    lq = torch.zeros(2, 3, 3, 40, 48)
    with torch.no_grad():
        flows = net.window_flows(*net.get_flows(lq))
        want = block(torch.zeros(2, 16, 3, 40, 48), *flows[1], net._aligner())
    torch.testing.assert_close(got, want, rtol=0, atol=0)


EXIT_CHILD = """
import sys, time
from gsmsr.ops.triton_jit import compile_pool

log = open(sys.argv[1], 'a', buffering=1)

def task(i):
    time.sleep(0.2)
    log.write(f'{i}\\n')

pool = compile_pool()
for i in range(4 * pool._max_workers):
    pool.submit(task, i)
"""


def test_exit_drops_compilations_not_yet_started(tmp_path):
    """At interpreter exit (an interrupted run) the compile pool runs only what its threads already started, not
    everything queued: four tasks a thread were queued, at most one a thread ran."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get('PYTHONPATH')])))
    log = tmp_path / 'ran.txt'
    proc = subprocess.run([sys.executable, '-c', EXIT_CHILD, str(log)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    workers = triton_jit.compile_pool()._max_workers
    ran = log.read_text().split() if log.exists() else []
    assert len(ran) <= workers < 4 * workers
