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

Importing this module does not need Triton.
"""

from __future__ import annotations

import types
from typing import Callable, Dict, Sequence

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


class LazyKernels:
    """``LazyKernels(module_name, [fn, ...])(interpret)`` -> namespace of JIT functions, by name without the
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
                    namespace[name] = jitted[name.lstrip('_')] = triton.jit(copy)
            namespace['SUM_OP'] = getattr(tl.standard, '_sum_combine', None) or namespace['_add_combine']
            self._built[interpret] = types.SimpleNamespace(**jitted)
        return self._built[interpret]
