"""alt_jax: joint layout and loop tuning for conv and matmul inside JAX.

Entry points: optimize (decorator / wrapper), Plan (what explain returns).
"""
