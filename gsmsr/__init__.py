"""gsmsr: Gather-Scatter Mamba (GSM) video super-resolution as a BasicSR plugin.

Importing the package applies the BasicSR compatibility fixes and registers ``GSMNet`` (ARCH_REGISTRY)
and ``GSMModel`` (MODEL_REGISTRY).
"""

from gsmsr import launch as _launch  # noqa: F401,I001  (first: notes when gsmsr started importing)
from gsmsr import compat as _compat

_compat.apply()

from gsmsr import models  # noqa: E402,F401  (registers GSMModel)
from gsmsr.archs import GSMNet, load_checkpoint  # noqa: E402

__version__ = '0.1.0'
__all__ = ['GSMNet', 'load_checkpoint', '__version__']
