"""fsp_jax: knowledge distillation with FSP matrices (Yim et al., CVPR 2017) in JAX/Flax."""

from fsp_jax import adapters, fsp, losses, models

__version__ = '0.1.0'
__all__ = ['adapters', 'fsp', 'losses', 'models']
