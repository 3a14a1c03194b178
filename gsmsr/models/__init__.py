"""BasicSR models of gsmsr; importing this package registers ``GSMModel`` in BasicSR's MODEL_REGISTRY."""

from gsmsr.models.gsm_model import GSMModel

__all__ = ['GSMModel']
