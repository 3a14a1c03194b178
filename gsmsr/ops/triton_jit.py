"""Triton kernels that run compiled on CUDA tensors and interpreted on CPU tensors, in one process.

Triton reads ``triton.knobs.runtime.interpret`` (``TRITON_INTERPRET``) when ``@triton.jit`` wraps a function, not
at launch. So kernel bodies are written as plain functions and :class:`LazyKernels` wraps them on first use, once
per mode, inside a knob scope that restores the knob and the environment. Each mode gets its own globals dict, so
a kernel finds the helpers of its own mode by name and the interpreter's additions stay out of the defining
module.

Triton's library functions (``tl.sum``, ``tl.cumsum``, ...) are themselves jitted when triton.language is imported,
so an interpreted kernel cannot call them; kernels reduce with ``tl.reduce(x, axis, SUM_OP)`` instead, where
``SUM_OP`` (put in every namespace) is Triton's own add combine: the same IR as ``tl.sum`` when compiled, and the
interpreter recognises it and uses numpy's sum.

Launches go through :class:`Kernel`, so that :func:`compile_ahead` can turn them into compilations started in
threads (a first run's kernels compiled side by side instead of one at each first launch).

Importing this module does not need Triton.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import types
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised by a subprocess test
    triton = None
    tl = None


def triton_available() -> bool:
    """True when Triton imports and a CUDA device is present (the compiled, fast path)."""
    return triton is not None and torch.cuda.is_available()


def runs_fused(x: Tensor) -> bool:
    """gsmsr's fused Triton kernels apply to x compiled: a CUDA tensor and Triton importable (modules re-export this
    under their own name, so a test can route one of them through the interpreter)."""
    return x.is_cuda and triton_available()


def interpret_for(t: Tensor) -> bool:
    """Interpret on CPU tensors, and everywhere when TRITON_INTERPRET was set (then Triton's own library
    functions are interpreted ones and cannot be compiled)."""
    return not t.is_cuda or bool(triton.knobs.runtime.interpret)


def _add_combine(a, b):  # fallback for SUM_OP if a Triton version lacks tl.standard._sum_combine
    return a + b


_AHEAD: ContextVar[bool] = ContextVar('gsmsr_compile_ahead', default=False)  # inside compile_ahead, this thread
_executor: Optional[ThreadPoolExecutor] = None


class Kernel:
    """A JIT function as the host code launches it, ``kernel[grid](*args, **kwargs)``; inside :func:`compile_ahead`
    that launch only starts the compilation (``JITFunction.warmup``, the same specialisation). ``jit`` is the JIT
    function itself (for Triton's compiler APIs); other attributes are its own.

    A launch after compilations started ahead first waits for them (all of this kernel's) and puts them in the JIT
    function's cache: Triton 3.6 (unlike 3.8) stores an asynchronous compilation there only once its result is
    asked for, so without this the launch compiled the kernel again (tests/gpu/test_compile_ahead_gpu.py)."""

    __slots__ = ('jit', '_pending')

    def __init__(self, jit: Any) -> None:
        self.jit = jit
        self._pending: List[Any] = []  # FutureKernels started ahead and not yet waited for

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        if _AHEAD.get():
            return functools.partial(self._start, grid)
        if self._pending:
            self._finish_pending()
        return self.jit[grid]

    def _start(self, grid: Any, *args: Any, **kwargs: Any) -> Any:
        kernel = self.jit.warmup(*args, grid=grid, **kwargs)
        if _is_future(kernel):
            self._pending.append(kernel)
        return kernel

    def _finish_pending(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            try:
                future.result()  # waits, then stores the compiled kernel under its specialisation
            except Exception:  # the launch compiles it again and reports the error where it belongs
                pass

    def __getattr__(self, name: str) -> Any:
        if name in Kernel.__slots__:  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self.jit, name)


def _is_future(kernel: Any) -> bool:
    """Whether ``warmup`` returned an asynchronous compilation (Triton's FutureKernel) rather than a kernel."""
    try:
        from triton.runtime._async_compile import FutureKernel
    except ImportError:
        return False
    return isinstance(kernel, FutureKernel)


def compile_pool() -> ThreadPoolExecutor:
    """The threads :func:`compile_ahead` compiles in (made at first use). At interpreter exit the compilations not
    yet started are dropped, so that an interrupted run waits for the running ones only (a thread pool's own exit
    handler would first run everything queued)."""
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix='gsmsr-compile')
        register = getattr(threading, '_register_atexit', None)  # runs before the pool's own exit handler
        if register is not None:
            register(functools.partial(_executor.shutdown, wait=False, cancel_futures=True))
    return _executor


@contextlib.contextmanager
def compile_ahead() -> Iterator[bool]:
    """Within it, every launch of gsmsr's kernels (CUDA, this thread) starts compiling that kernel in a thread
    pool and returns without running it, so their outputs hold garbage; yields whether that is on (it needs Triton's
    asynchronous compilation, ``triton.runtime._async_compile``, Triton >= 3.4). The compilations go on after the
    block; a later launch of the kernel waits for them (:class:`Kernel`), then runs. Triton's compiler
    releases the GIL for most of its work, so the kernels compile side by side (and beside the caller's work)."""
    try:
        from triton.runtime import _async_compile

        mode = _async_compile.AsyncCompileMode(compile_pool())
    except (ImportError, AttributeError, TypeError):
        yield False
        return
    token, ahead = _async_compile.active_mode.set(mode), _AHEAD.set(True)
    try:
        yield True
    finally:
        _AHEAD.reset(ahead)
        _async_compile.active_mode.reset(token)


class LazyKernels:
    """``LazyKernels(module_name, [fn, ...])(interpret)`` -> namespace of :class:`Kernel`, by name without the
    leading underscore. Functions later in the list may call earlier ones by their own names.

    ``interpreted``: stand-ins that replace the functions of the same name when interpreting, for compiled-only
    bodies such as inline PTX. The interpreter re-reads a function's source and looks the result up by name, so
    a stand-in must be defined under that name (in a class body, say)."""

    def __init__(self, module_name: str, functions: Sequence[Callable], interpreted: Sequence[Callable] = ()) -> None:
        self.module_name = module_name
        self.functions = list(functions)
        self.interpreted = {fn.__name__: fn for fn in interpreted}
        self._built: Dict[bool, types.SimpleNamespace] = {}

    def __call__(self, interpret: bool) -> types.SimpleNamespace:
        if triton is None:
            raise RuntimeError(f'{self.module_name} needs the triton package')
        if interpret not in self._built:
            namespace = {'__name__': self.module_name, 'tl': tl, 'triton': triton}
            jitted = {}
            with triton.knobs.runtime.scope():  # restores the knob and TRITON_INTERPRET afterwards
                triton.knobs.runtime.interpret = interpret
                for fn in [*self.functions, _add_combine]:
                    name = fn.__name__
                    if interpret:
                        fn = self.interpreted.get(name, fn)
                    copy = types.FunctionType(fn.__code__, namespace, name, fn.__defaults__, fn.__closure__)
                    copy.__annotations__ = dict(fn.__annotations__)
                    copy.__doc__ = fn.__doc__
                    copy.__qualname__ = fn.__qualname__
                    namespace[name] = triton.jit(copy)
                    jitted[name.lstrip('_')] = Kernel(namespace[name])
            namespace['SUM_OP'] = getattr(tl.standard, '_sum_combine', None) or namespace['_add_combine']
            self._built[interpret] = types.SimpleNamespace(**jitted)
        return self._built[interpret]
