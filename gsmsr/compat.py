"""Compatibility fixes that let basicsr 1.4.2 run on current torch / torchvision / numpy / Python.

Applied once by ``gsmsr/__init__.py``: the torchvision shim goes in before BasicSR is imported (BasicSR imports
the removed module at import time); the other fixes replace single BasicSR functions after the import.
Every fix lives here, and each is idempotent:

* ``torchvision.transforms.functional_tensor`` (removed in torchvision 0.17) is provided again.
* ``--launcher pytorch`` under ``torchrun``: BasicSR always asks for NCCL and calls ``torch.cuda.set_device``;
  here CPU-only processes use gloo, and the GPU comes from ``LOCAL_RANK`` (right on several nodes too).
* Resuming: BasicSR maps the training state onto ``cuda`` (fails without a GPU) and relies on the old
  ``torch.load`` default; here the state is read onto the CPU with ``weights_only=True`` (optimizers move their
  state to the parameters' device themselves), and the state directory is the one the options name.

CUDA-only tensors in video validation are not patched here: :class:`gsmsr.models.GSMModel` has its own
device-agnostic validation.
"""

from __future__ import annotations

import os
import sys
import types
from typing import Any, Dict, Optional

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


def init_dist_pytorch(backend: str = 'nccl', **kwargs: Any) -> None:
    """Process-group setup for ``torchrun`` (replaces ``basicsr.utils.dist_util._init_dist_pytorch``).

    NCCL and one GPU per process (``LOCAL_RANK``) when CUDA is available, gloo otherwise. torchrun provides
    RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (also for multi-node rendezvous).
    """
    import torch
    import torch.distributed as dist

    missing = [k for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT') if k not in os.environ]
    if missing:
        raise RuntimeError(
            f'--launcher pytorch needs the environment set by torchrun (missing {", ".join(missing)}); '
            'start with: torchrun --nproc_per_node=N <script> -opt X.yml --launcher pytorch'
        )
    if torch.cuda.is_available():
        local_rank = int(os.environ.get('LOCAL_RANK', int(os.environ['RANK']) % torch.cuda.device_count()))
        torch.cuda.set_device(local_rank)
    elif backend == 'nccl':
        backend = 'gloo'
    dist.init_process_group(backend=backend, **kwargs)


def load_training_state(path: str) -> Dict[str, Any]:
    """A BasicSR ``.state`` file (epoch, iter, optimizer and scheduler states), read onto the CPU."""
    import torch

    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:
        raise ValueError(f'{path}: cannot read training state ({type(err).__name__}: {err})') from err


def load_resume_state(opt: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Replacement for ``basicsr.train.load_resume_state``: device-agnostic, same option semantics.

    With ``auto_resume`` the newest ``<iter>.state`` in the experiment's ``training_states`` folder is used;
    otherwise ``path.resume_state`` if set. ``check_resume`` then points ``pretrain_network_g`` at the matching
    ``net_g_<iter>.pth``.
    """
    from basicsr.utils import check_resume

    state_path = None
    if opt['auto_resume']:
        state_dir = opt['path']['training_states']
        if os.path.isdir(state_dir):
            iters = [
                int(f[: -len('.state')])
                for f in os.listdir(state_dir)
                if f.endswith('.state') and f[: -len('.state')].isdigit()
            ]
            if iters:
                state_path = os.path.join(state_dir, f'{max(iters)}.state')
                opt['path']['resume_state'] = state_path
    else:
        state_path = opt['path'].get('resume_state')
    if state_path is None:
        return None
    state = load_training_state(state_path)
    check_resume(opt, state['iter'])
    return state


def _patch_basicsr() -> None:
    import importlib

    dist_util = importlib.import_module('basicsr.utils.dist_util')
    dist_util._init_dist_pytorch = init_dist_pytorch  # looked up at call time by dist_util.init_dist
    train = importlib.import_module('basicsr.train')
    train.load_resume_state = load_resume_state  # looked up at call time by train_pipeline


def apply() -> None:
    """Apply all fixes (idempotent)."""
    global _applied
    if _applied:
        return
    _shim_functional_tensor()
    _patch_basicsr()
    _applied = True
