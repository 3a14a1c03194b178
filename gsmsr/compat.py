"""Compatibility fixes that let basicsr 1.4.2 run on current torch / torchvision / numpy.

Applied once by ``gsmsr/__init__.py`` before anything imports BasicSR. Every fix lives here.
"""
from __future__ import annotations

import sys
import types

_applied = False


def _shim_functional_tensor() -> None:
    # basicsr.data.degradations imports a torchvision module removed in torchvision 0.17.
    name = 'torchvision.transforms.functional_tensor'
    if name in sys.modules:
        return
    try:
        __import__(name)
        return
    except ImportError:
        pass
    from torchvision.transforms import functional
    module = types.ModuleType(name)
    module.rgb_to_grayscale = functional.rgb_to_grayscale
    sys.modules[name] = module


def apply() -> None:
    """Apply all fixes (idempotent)."""
    global _applied
    if _applied:
        return
    _shim_functional_tensor()
    _applied = True
