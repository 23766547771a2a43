"""The joint layout + loop tuner for alt_jax: depends on alt_jax, never the reverse.

Modules: measure (builder, runner and the measurement protocol), worker (the process that
runs candidate kernels). Importing the package imports nothing heavy.
"""
