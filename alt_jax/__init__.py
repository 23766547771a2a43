"""alt_jax: joint layout and loop tuning for conv and matmul inside JAX.

Entry points: optimize (decorator / wrapper), Optimized, FallbackWarning.
"""
from alt_jax.api import Optimized, optimize
from alt_jax.planner import FallbackWarning

__all__ = ["optimize", "Optimized", "FallbackWarning"]
__version__ = "0.1.0"
