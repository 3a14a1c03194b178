"""Compilation paid once per machine: persistent ``torch.compile`` caches and a Mega-Cache file.

* :func:`enable_persistent_caches` points Inductor's cache (which also holds Triton's, unless ``TRITON_CACHE_DIR``
  is set) at a per-user folder, ``$XDG_CACHE_HOME/gsmsr`` (default ``~/.cache/gsmsr``), instead of the system
  temporary folder, which is emptied at reboot or per container; and turns the FX-graph and AOTAutograd caches on.
  Variables the user set are left alone. Dynamo still traces in every process; what the caches save is
  Inductor's code generation, Triton compilation and autotuning (FAST_KERNELS.md §D).
* :class:`MegaCache` saves ``torch.compiler.save_cache_artifacts()`` to one file per software and GPU
  combination (:func:`cache_key`: torch, Triton, CUDA, GPU name and compute capability, gsmsr), written
  atomically, and loads it into the caches at start. Those artifacts are portable between machines of the same
  combination, so the file can be copied along with the weights.

Used by ``gsmsr infer``; the functions are independent of it (tests and training can call them too).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch

from gsmsr.faults import one_line
from gsmsr.utils import atomic_write_bytes

__all__ = ['cache_root', 'enable_persistent_caches', 'cache_key', 'MegaCache']

# environment variable -> sub-folder of the cache root
_CACHE_DIRS = {'TORCHINDUCTOR_CACHE_DIR': 'inductor', 'TRITON_CACHE_DIR': 'triton'}


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/gsmsr``, or ``~/.cache/gsmsr``."""
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return Path(base) / 'gsmsr'


def enable_persistent_caches(root: Optional[Path] = None) -> Path:
    """Persistent Inductor/Triton cache folders under ``root`` (default :func:`cache_root`) where the user set
    none, and the FX-graph and AOTAutograd caches on unless the environment says otherwise. Returns ``root``.

    Call it before the first compilation of the process (Inductor reads the folders when it first needs them).
    A user-set ``TORCHINDUCTOR_CACHE_DIR`` alone keeps Triton's cache inside it, as Inductor does by default.
    Torch's own default folder there does not count as the user's: importing ``torch._dynamo`` writes it into the
    environment, so without this exception the folders under ``root`` would never be used.
    Where ``root`` cannot be created (a read-only home), Inductor's defaults stay.
    """
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    root = Path(root) if root is not None else cache_root()
    if _inductor_dir_is_torch_default():
        del os.environ['TORCHINDUCTOR_CACHE_DIR']
    if 'TORCHINDUCTOR_CACHE_DIR' not in os.environ:
        try:
            for var, sub in _CACHE_DIRS.items():
                if var not in os.environ:
                    (root / sub).mkdir(parents=True, exist_ok=True)
                    os.environ[var] = str(root / sub)
        except OSError:
            pass
    if os.environ.get('TORCHINDUCTOR_FX_GRAPH_CACHE') is None:
        inductor_config.fx_graph_cache = True
    if os.environ.get('TORCHINDUCTOR_AUTOGRAD_CACHE') is None:
        functorch_config.enable_autograd_cache = True
    return root


def _inductor_dir_is_torch_default() -> bool:
    """Whether ``TORCHINDUCTOR_CACHE_DIR`` holds torch's own default (a folder in the system temporary folder):
    importing ``torch._dynamo`` writes that default into the environment (torch 2.11 and 2.14 do), so its presence
    does not mean that the user chose a folder."""
    value = os.environ.get('TORCHINDUCTOR_CACHE_DIR')
    if not value:
        return False
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        return os.path.abspath(value) == os.path.abspath(default_cache_dir())
    except Exception:  # another torch layout: treat the value as the user's
        return False


def cache_key(device: torch.device) -> Dict[str, Optional[str]]:
    """What compiled artifacts depend on: torch, Triton and CUDA versions, the GPU, and gsmsr's version."""
    import gsmsr

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = capability = None
    if device.type == 'cuda':
        gpu = torch.cuda.get_device_name(device)
        capability = '.'.join(map(str, torch.cuda.get_device_capability(device)))
    return {
        'torch': torch.__version__,
        'triton': triton_version,
        'cuda': torch.version.cuda,
        'gpu': gpu,
        'capability': capability,
        'gsmsr': gsmsr.__version__,
    }


def _key_file_name(key: Dict[str, Optional[str]]) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    readable = re.sub(r'[^A-Za-z0-9.]+', '-', f'{key.get("gpu") or "cpu"}-torch{key.get("torch")}').strip('-')
    return f'{readable}-{digest}.megacache'


class MegaCache:
    """One Mega-Cache file: :meth:`load` its artifacts into the compile caches, :meth:`save` the process's.

    ``save_artifacts`` / ``load_artifacts`` default to ``torch.compiler.save_cache_artifacts`` /
    ``load_cache_artifacts`` (replaceable for tests). A file that cannot be read or loaded is ignored and a
    failed save only warns: a broken cache must never stop inference, it only costs a compilation.
    """

    def __init__(
        self,
        path: Path,
        save_artifacts: Optional[Callable[[], Optional[Tuple[bytes, object]]]] = None,
        load_artifacts: Optional[Callable[[bytes], object]] = None,
    ) -> None:
        self.path = Path(path)
        self._save_artifacts = save_artifacts or torch.compiler.save_cache_artifacts
        self._load_artifacts = load_artifacts or torch.compiler.load_cache_artifacts
        self._digest: Optional[str] = None  # of the bytes on disk, so an unchanged cache is not rewritten

    @classmethod
    def for_device(cls, device: torch.device, root: Optional[Path] = None) -> MegaCache:
        """The file for this software and GPU combination under ``root`` (default :func:`cache_root`)."""
        root = Path(root) if root is not None else cache_root()
        return cls(root / 'megacache' / _key_file_name(cache_key(device)))

    def load(self) -> bool:
        """Load the file's artifacts into the compile caches; False when there is none or it is unusable."""
        try:
            data = self.path.read_bytes()
        except OSError:
            return False
        try:
            self._load_artifacts(data)
        except Exception:  # written by an incompatible build or corrupt: recompile instead
            return False
        self._digest = hashlib.sha256(data).hexdigest()
        return True

    def save(self) -> bool:
        """Write this process's artifacts (atomically) if there are any and they differ from the file's."""
        try:
            result = self._save_artifacts()
            if not result or not result[0]:
                return False
            data = result[0]
            digest = hashlib.sha256(data).hexdigest()
            if digest == self._digest:
                return False
            atomic_write_bytes(self.path, data)
        except Exception as e:  # full disk, read-only home, an artifact torch cannot serialise
            print(f'warning: compile cache not saved to {self.path}: {one_line(e, 200)}', file=sys.stderr)
            return False
        self._digest = digest
        return True
