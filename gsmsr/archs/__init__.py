"""The GSM network, one file per component: SWSA, implicit warp, bidirectional Mamba, GSM block, GSMNet."""

from gsmsr.archs.checkpoint import load_checkpoint, read_state_dict
from gsmsr.archs.gsmnet_arch import GSMNet

__all__ = ['GSMNet', 'load_checkpoint', 'read_state_dict']
