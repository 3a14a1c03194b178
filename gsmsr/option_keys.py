"""Misspelled option keys are errors: BasicSR reads options with ``.get`` and silently ignores unknown keys.

:func:`check_option_keys` compares the keys of the sections GSMModel reads (``train``, ``val``, ``path``,
``network_g``) with those BasicSR 1.4.2 (``train.py``, ``base_model``, ``sr_model``, ``video_base_model``,
``video_recurrent_model``, ``utils/options.py``, ``check_resume``) and gsmsr read, and names every unknown key
with the nearest known one ("train.ema_decy: unknown; did you mean ema_decay?"). ``network_g`` is checked
against the constructor of its registered ``type``. A top-level ``allow_unknown_keys: true`` turns the error
into a warning (for keys read by code outside gsmsr and BasicSR).
"""

from __future__ import annotations

import difflib
import inspect
import sys
from typing import Any, Dict, List, Mapping, Optional

from gsmsr.faults import InputError

__all__ = ['KNOWN_KEYS', 'ALLOW_KEY', 'unknown_option_keys', 'check_option_keys']

ALLOW_KEY = 'allow_unknown_keys'
KNOWN_KEYS: Dict[str, frozenset] = {
    'train': frozenset(
        # BasicSR: train_pipeline, setup_schedulers, SRModel, VideoRecurrentModel
        ['total_iter', 'warmup_iter', 'ema_decay', 'optim_g', 'scheduler', 'pixel_opt', 'perceptual_opt']
        + ['fix_flow', 'flow_lr_mul']
        # gsmsr's GSMModel
        + ['use_bf16', 'cuda_graph', 'grad_clip_norm']
    ),
    'val': frozenset(
        # BasicSR: train_pipeline, SRModel / VideoRecurrentModel validation
        ['val_freq', 'save_img', 'suffix', 'metrics', 'pbar', 'flip_seq', 'center_frame_only']
        # gsmsr's GSMModel.test
        + ['chunk', 'chunk_overlap', 'tile', 'tile_overlap', 'use_bf16', 'compile']
    ),
    'path': frozenset(
        # set by users, read by SRModel, train_pipeline and check_resume
        ['pretrain_network_g', 'param_key_g', 'strict_load_g', 'resume_state', 'ignore_resume_networks']
        # set by BasicSR's parse_options (may also be given)
        + ['root', 'experiments_root', 'models', 'training_states', 'log', 'visualization', 'results_root']
    ),
}
PER_NETWORK_PATH_KEYS = ('pretrain_network_{}', 'param_key_{}', 'strict_load_{}')  # for every network_<x>


def _network_keys(network_opt: Mapping[str, Any]) -> Optional[frozenset]:
    """Keyword arguments of the registered architecture ``network_opt['type']`` (None: unknown or **kwargs)."""
    from basicsr.utils.registry import ARCH_REGISTRY

    try:
        arch = ARCH_REGISTRY.get(network_opt.get('type'))
    except KeyError:
        return None  # BasicSR names an unregistered type itself
    params = inspect.signature(arch).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(['type'] + [p.name for p in params])


def unknown_option_keys(opt: Mapping[str, Any]) -> List[str]:
    """'section.key: unknown; did you mean X?' for every unknown key of the checked sections, in file order."""
    known = dict(KNOWN_KEYS)
    networks = [k[len('network_') :] for k in opt if k.startswith('network_')]
    known['path'] = known['path'] | {f.format(n) for n in networks for f in PER_NETWORK_PATH_KEYS}
    if isinstance(opt.get('network_g'), Mapping):
        network_keys = _network_keys(opt['network_g'])
        if network_keys is not None:
            known['network_g'] = network_keys
    problems = []
    for section, keys in known.items():
        values = opt.get(section)
        if not isinstance(values, Mapping):
            continue
        for key in values:
            if key in keys:
                continue
            close = difflib.get_close_matches(str(key), sorted(keys), n=1, cutoff=0.6)
            hint = f'; did you mean {close[0]}?' if close else ''
            problems.append(f'{section}.{key}: unknown{hint}')
    return problems


def check_option_keys(opt: Mapping[str, Any], source: str = 'options') -> None:
    """Raise :class:`InputError` naming every unknown key (see :func:`unknown_option_keys`); with a top-level
    ``allow_unknown_keys: true`` print them as a warning instead."""
    problems = unknown_option_keys(opt)
    if not problems:
        return
    listed = '; '.join(problems)
    if opt.get(ALLOW_KEY):
        print(f'warning: {source}: {listed} (allowed by {ALLOW_KEY})', file=sys.stderr)
        return
    raise InputError(f'{source}: {listed} (set {ALLOW_KEY}: true at the top level to allow unknown keys)')
