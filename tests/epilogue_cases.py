"""The fused-epilogue combinations every kernel family is tested with: each activation, and
the scale/shift/residual combinations the planner fuses (BN affine, bias, residual)."""
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
