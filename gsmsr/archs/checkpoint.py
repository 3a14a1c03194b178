"""Loading GSMNet weights: BasicSR checkpoints (``params`` / ``params_ema``), bare state dicts, official files."""

from __future__ import annotations

import os
from typing import Dict, Optional, Union

import torch
from torch import Tensor, nn

StateDict = Dict[str, Tensor]


def read_state_dict(source: Union[str, os.PathLike, dict], key: Optional[str] = 'params') -> StateDict:
    """The state dict inside a checkpoint file (or an already loaded dict), ``module.`` prefixes stripped.

    key: which entry of a BasicSR file to use ('params' or 'params_ema'); a file without that entry but with the
    other one is an error naming the keys present; a bare state dict is used as it is. ``key=None`` prefers
    'params_ema', then 'params', then bare. A value that is not a tensor is a ValueError naming its key.
    """
    name = os.fspath(source) if not isinstance(source, dict) else '<state dict>'
    if isinstance(source, dict):
        ckpt = source
    else:
        if not os.path.isfile(name):
            raise FileNotFoundError(f'checkpoint not found: {name}')
        try:
            ckpt = torch.load(name, map_location='cpu', weights_only=True)
        except Exception as err:  # corrupt or not a torch file
            raise ValueError(f'{name}: cannot read checkpoint ({type(err).__name__}: {err})') from err
    if not isinstance(ckpt, dict):
        raise ValueError(f'{name}: expected a dict of tensors, got {type(ckpt).__name__}')
    wrappers = [k for k in ('params', 'params_ema', 'state_dict', 'model') if isinstance(ckpt.get(k), dict)]
    if wrappers:
        if key is None:
            key = next(k for k in ('params_ema', 'params', 'state_dict', 'model') if k in wrappers)
        if key not in wrappers:
            raise KeyError(f'{name}: no {key!r} in checkpoint (it has {", ".join(wrappers)})')
        ckpt = ckpt[key]
    sd = {}
    for k, v in ckpt.items():
        if not isinstance(v, Tensor):  # caught here, not as an AttributeError deep in loading
            raise ValueError(f'{name}: entry {k!r} is a {type(v).__name__}, not a tensor')
        while k.startswith('module.'):
            k = k[len('module.') :]
        sd[k] = v
    return sd


def load_checkpoint(
    net: nn.Module, source: Union[str, os.PathLike, dict], key: Optional[str] = 'params', strict: bool = True
) -> nn.Module:
    """Load weights into ``net``; deterministic buffers missing from the file keep their computed values.

    With ``strict`` (the default) any missing parameter, unexpected key or shape mismatch raises a ValueError
    that lists all of them.
    """
    sd = read_state_dict(source, key)
    own = net.state_dict()
    persistent_buffers = {name for name, _ in net.named_buffers()}
    missing = [k for k in own if k not in sd and k not in persistent_buffers]
    unexpected = [k for k in sd if k not in own]
    mismatched = [
        f'{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}'
        for k in sd
        if k in own and sd[k].shape != own[k].shape
    ]
    if strict and (missing or unexpected or mismatched):
        name = os.fspath(source) if not isinstance(source, dict) else 'state dict'
        lines = [f'{name} does not match {type(net).__name__}:']
        for title, items in (('missing', missing), ('unexpected', unexpected), ('shape mismatch', mismatched)):
            if items:
                more = ' ...' if len(items) > 20 else ''
                lines.append(f'  {title} ({len(items)}): ' + ', '.join(items[:20]) + more)
        raise ValueError('\n'.join(lines))
    merged = {k: sd.get(k, own[k]) for k in own if k not in unexpected}
    if not strict:
        merged = {k: v for k, v in merged.items() if v.shape == own[k].shape}
    net.load_state_dict(merged, strict=strict)
    return net
