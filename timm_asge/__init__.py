"""timm-asge: Adaptive Spatial Goodness Encoding (ASGE) models for timm, trained without end-to-end backprop.

``import timm_asge`` registers the ``asge_*`` architectures in timm's model registry.
"""
from .goodness import AsgeBlock
from .models import AsgeCnn
from .engine import LocalLearner, choose_best_block, evaluate, param_groups

__all__ = ['AsgeBlock', 'AsgeCnn', 'LocalLearner', 'choose_best_block', 'evaluate', 'param_groups']

__version__ = '0.1.0'
