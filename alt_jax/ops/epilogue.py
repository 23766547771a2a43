"""What a kernel does to its output tile before storing it: the fused epilogue.

Entry points: Epilogue (frozen), ACTIVATIONS, Epilogue.reference (the jnp meaning).
Order, fixed for every template: y = act(acc * scale[k] + shift[k] + residual[...]).
scale/shift are per-output-channel float32 vectors of length K (BN's folded affine, or a
bias as shift); residual has the result's shape and layout. The kernel's extra inputs come
after its operands, in the order of Epilogue.inputs().
At every float32 value a fused activation gives what jax.jit gives for Epilogue.reference:
the same NaNs, infinities and signs of zero, relu / relu6 exactly, the others to ~1e-6
(csrc/include/alt_jax/epilogue.h, tests/test_fusion_soundness.py). Which jaxpr regions are
taken for an activation: alt_jax/activations.py.
"""
from __future__ import annotations

import dataclasses

ACTIVATIONS = ("none", "relu", "relu6", "gelu_tanh", "gelu_erf", "silu")
# The templates' integer codes (csrc/include/alt_jax/activation_codes.h: ALT_ACT_*).
ACTIVATION_CODES = {name: i for i, name in enumerate(ACTIVATIONS)}


@dataclasses.dataclass(frozen=True, order=True)
class Epilogue:
    scale: bool = False
    shift: bool = False
    residual: bool = False
    activation: str = "none"

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"Epilogue.activation={self.activation!r}: choose one of "
                             f"{ACTIVATIONS}")

    @property
    def is_identity(self) -> bool:
        return self == Epilogue()

    @property
    def activation_code(self) -> int:
        return ACTIVATION_CODES[self.activation]

    def inputs(self) -> tuple:
        """Names of the extra kernel inputs, in order."""
        return tuple(n for n in ("scale", "shift", "residual") if getattr(self, n))

    def output_aliases(self, reuse_residual: bool, leading: int = 2) -> dict | None:
        """ffi_call aliases writing the output (index 0) into the residual operand, which
        follows `leading` operands and the other epilogue inputs; None when not reusing."""
        if not reuse_residual:
            return None
        if not self.residual:
            raise ValueError("reuse_residual=True needs an epilogue with a residual")
        return {leading + len(self.inputs()) - 1: 0}

    def describe(self) -> str:
        parts = [p for p in ("scale", "shift", "residual") if getattr(self, p)]
        if self.activation != "none":
            parts.append(self.activation)
        return "+".join(parts) or "none"

    def reference(self, y, channel_axis: int, scale=None, shift=None, residual=None):
        """The epilogue in jnp, for tests and fallbacks: y is the raw conv/matmul result."""
        import jax
        import jax.numpy as jnp

        shape = [1] * y.ndim
        shape[channel_axis] = -1
        if self.scale:
            y = y * jnp.reshape(scale, shape)
        if self.shift:
            y = y + jnp.reshape(shift, shape)
        if self.residual:
            y = y + residual
        if self.activation == "relu":
            y = jnp.maximum(y, 0.0)
        elif self.activation == "relu6":
            y = jnp.minimum(jnp.maximum(y, 0.0), 6.0)
        elif self.activation == "gelu_tanh":
            y = jax.nn.gelu(y, approximate=True)
        elif self.activation == "gelu_erf":
            y = jax.nn.gelu(y, approximate=False)
        elif self.activation == "silu":
            y = jax.nn.silu(y)
        return y
