"""The fused-epilogue combinations every kernel family is tested with: each activation, and
the scale/shift/residual combinations the planner fuses (BN affine, bias, residual); and
EDGE_VALUES, the pre-activation values where fused activations must agree with jax.jit."""
from alt_jax.ops.epilogue import Epilogue

EPILOGUES = [
    Epilogue(shift=True),
    Epilogue(scale=True, shift=True),
    Epilogue(scale=True, shift=True, residual=True, activation="relu"),
    Epilogue(shift=True, activation="gelu_tanh"),
    Epilogue(scale=True, shift=True, activation="relu6"),
    Epilogue(activation="silu"),
    Epilogue(activation="gelu_erf"),
]

# Pre-activation values where a fused activation must still give what jax.jit gives for the
# unfused program: IEEE specials, float32 extremes, where x**3 (gelu_tanh) or exp(-x) (silu)
# overflow, where exp underflows, relu6's bound and its float32 neighbours.
EDGE_VALUES = (
    float("-inf"), float("inf"), float("nan"), -0.0, 0.0,
    3.4028234663852886e38, -3.4028234663852886e38, 1e-40, -1e-40, 1.1754944e-38,
    1e20, -1e20, 1e13, -1e13, 5e4, -5e4, 150.0, -150.0, 104.0, -104.0,
    89.0, -89.0, 88.8, -88.8, 88.5, -88.5, 87.5, -87.5, 44.0, -44.0, 10.5, -10.5,
    6.0, 5.9999995, 6.0000005, 3.0, -3.0, 1.0, -1.0, 1e-3, -1e-3,
)
