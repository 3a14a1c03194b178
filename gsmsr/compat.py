"""Compatibility fixes that let basicsr 1.4.2 run on current torch / torchvision / numpy / Python.

Applied once by ``gsmsr/__init__.py``: the torchvision shim goes in before BasicSR is imported (BasicSR imports
the removed module at import time); the other fixes replace single BasicSR functions after the import.
Every fix lives here, and each is idempotent:

* ``torchvision.transforms.functional_tensor`` (removed in torchvision 0.17) is provided again.
* ``--launcher pytorch`` under ``torchrun``: BasicSR always asks for NCCL and calls ``torch.cuda.set_device``;
  here CPU-only processes use gloo, and the GPU comes from ``LOCAL_RANK`` (right on several nodes too).
* Resuming: BasicSR maps the training state onto ``cuda`` (fails without a GPU) and relies on the old
  ``torch.load`` default; here the state is read onto the CPU with ``weights_only=True`` (optimizers move their
  state to the parameters' device themselves), and the state directory is the one the options name. With
  ``--auto_resume`` a state or model file that does not load (a crash while saving, a full disk) is named and
  skipped: the run resumes from the newest iteration whose state and models all load, says so on stderr and
  in the log (:func:`take_resume_notes`), and deletes nothing.

* ``flow_warp`` (used by SpyNet and by GSMNet) builds its pixel grid on the CPU and copies it to the GPU on every
  call: a synchronising host copy, which also forbids capturing a training step as a CUDA graph. The
  replacement builds the same grid (integer coordinates cast to the input's dtype, then fp32) on the input's
  device; everything else is BasicSR's code path, so the values are identical.

CUDA-only tensors in video validation are not patched here: :class:`gsmsr.models.GSMModel` has its own
device-agnostic validation.
"""

from __future__ import annotations

import os
import sys
import types
from typing import Any, Dict, List, Optional

from gsmsr.faults import InputError

_applied = False
_resume_notes: List[str] = []  # said before BasicSR's logger exists; GSMModel logs them once it does
basicsr_flow_warp = None  # BasicSR's own flow_warp, before :func:`flow_warp` replaces it


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


def checkpoint_problem(path: str) -> Optional[str]:
    """Why ``path`` is not a loadable BasicSR model checkpoint (missing, unreadable, no params), or None."""
    import torch

    if not os.path.isfile(path):
        return f'{path}: no such model checkpoint'
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:
        cause = ' '.join(str(err).split())[:200]
        return f'{path}: cannot read model checkpoint ({type(err).__name__}: {cause})'
    if not isinstance(ckpt, dict) or not any(isinstance(ckpt.get(k), dict) for k in ('params', 'params_ema')):
        return f'{path}: not a BasicSR model checkpoint (no params)'
    return None


def resume_model_paths(opt: Dict[str, Any], resume_iter: int) -> List[str]:
    """The ``net_<x>_<iter>.pth`` files ``check_resume`` points the networks at when resuming ``resume_iter``."""
    ignored = opt['path'].get('ignore_resume_networks') or []
    return [
        os.path.join(opt['path']['models'], f'net_{key[len("network_") :]}_{resume_iter}.pth')
        for key in opt
        if key.startswith('network_') and key not in ignored
    ]


def _resume_note(opt: Dict[str, Any], message: str) -> None:
    if opt.get('rank', 0) == 0:
        print(f'warning: {message}', file=sys.stderr, flush=True)
        _resume_notes.append(message)


def take_resume_notes() -> List[str]:
    """The resume warnings not logged yet (emptied): BasicSR resumes before its logger is set up."""
    notes = list(_resume_notes)
    _resume_notes.clear()
    return notes


def _newest_loadable_state(opt: Dict[str, Any], state_dir: str) -> Optional[Dict[str, Any]]:
    """The newest ``<iter>.state`` in ``state_dir`` whose state and model files all load (None: no states).

    Every broken file is named in a resume note; broken files are left where they are.
    """
    stems = [f[: -len('.state')] for f in os.listdir(state_dir) if f.endswith('.state')]
    iters = sorted((int(stem) for stem in stems if stem.isdigit()), reverse=True)
    skipped = []
    for resume_iter in iters:
        state_path = os.path.join(state_dir, f'{resume_iter}.state')
        problems = [p for p in map(checkpoint_problem, resume_model_paths(opt, resume_iter)) if p]
        state = None
        try:
            state = load_training_state(state_path)
        except ValueError as err:
            problems.insert(0, str(err))
        for problem in problems:
            _resume_note(opt, f'auto_resume: {problem}; iteration {resume_iter} skipped (the file is kept)')
        if problems:
            skipped.append(resume_iter)
            continue
        if skipped:
            _resume_note(
                opt,
                f'auto_resume: resuming from iteration {resume_iter}, the newest whose training state and models '
                f'all load (skipped: {", ".join(map(str, skipped))})',
            )
        opt['path']['resume_state'] = state_path
        return state
    if iters:
        raise InputError(
            f'--auto_resume: no iteration in {state_dir} has a training state and models that load '
            f'(tried {", ".join(map(str, iters))}; see the warnings above)'
        )
    return None


def load_resume_state(opt: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Replacement for ``basicsr.train.load_resume_state``: device-agnostic, same option semantics.

    With ``auto_resume`` the newest ``<iter>.state`` in the experiment's ``training_states`` folder whose state
    and ``net_g_<iter>.pth`` both load is used (see :func:`_newest_loadable_state`); otherwise
    ``path.resume_state`` if set. ``check_resume`` then points ``pretrain_network_g`` at the matching
    ``net_g_<iter>.pth``.
    """
    from basicsr.utils import check_resume

    state = None
    if opt['auto_resume']:
        state_dir = opt['path']['training_states']
        if os.path.isdir(state_dir):
            state = _newest_loadable_state(opt, state_dir)
    elif opt['path'].get('resume_state'):
        try:
            state = load_training_state(opt['path']['resume_state'])
        except ValueError as err:
            raise InputError(str(err)) from None
    if state is None:
        return None
    check_resume(opt, state['iter'])
    return state


def flow_warp(x, flow, interp_mode: str = 'bilinear', padding_mode: str = 'zeros', align_corners: bool = True):
    """BasicSR's ``flow_warp`` (x (N, C, H, W), flow (N, H, W, 2)) with its grid made on x's device."""
    import torch
    from torch.nn import functional as F

    if x.size()[-2:] != flow.size()[1:3]:
        raise ValueError(f'flow_warp: x {tuple(x.shape)} and flow {tuple(flow.shape)} differ in H, W')
    _, _, h, w = x.size()
    rows = torch.arange(h, device=x.device).to(x.dtype)
    cols = torch.arange(w, device=x.device).to(x.dtype)
    grid_y, grid_x = torch.meshgrid(rows, cols, indexing='ij')
    vgrid = torch.stack((grid_x, grid_y), 2).float() + flow
    vgrid_x = 2.0 * vgrid[:, :, :, 0] / max(w - 1, 1) - 1.0
    vgrid_y = 2.0 * vgrid[:, :, :, 1] / max(h - 1, 1) - 1.0
    vgrid_scaled = torch.stack((vgrid_x, vgrid_y), dim=3)
    return F.grid_sample(x, vgrid_scaled, mode=interp_mode, padding_mode=padding_mode, align_corners=align_corners)


def _patch_basicsr() -> None:
    import importlib

    global basicsr_flow_warp
    arch_util = importlib.import_module('basicsr.archs.arch_util')
    if basicsr_flow_warp is None:
        basicsr_flow_warp = arch_util.flow_warp  # kept for the test that compares the two
    for name in ('basicsr.archs.arch_util', 'basicsr.archs.spynet_arch'):  # both bind the name at import
        importlib.import_module(name).flow_warp = flow_warp

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
