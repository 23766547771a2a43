"""A BERT-base encoder stack (Devlin et al. 2019), inference: post-LayerNorm layers over the
embeddings output. Entry point: build(num_layers, layout, batch) -> Model.

Seq 128 (or `seq`), hidden 768, 12 heads of 64, FFN 3072, tanh GELU, no attention mask, no embedding
lookup: the input is a (batch, 128, 768) float32 activation. Dense weights are (in, out).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from benchmarks.models.common import Model, Params

SEQ, HIDDEN, HEADS, FFN = 128, 768, 12, 3072
HEAD_DIM = HIDDEN // HEADS
LAYOUTS = ("nhwc",)  # the one form a sequence model has; named so the zoo's builders agree


def _init(num_layers: int, seed: int = 0) -> dict:
    p = Params(seed)

    def dense(n_in, n_out):
        return {"w": p.normal((n_in, n_out), 0.02), "b": p.normal((n_out,), 0.02)}

    def layer_norm():
        return {"gamma": p.uniform((HIDDEN,), 0.8, 1.2), "beta": p.normal((HIDDEN,), 0.02)}

    return {"layers": [{"q": dense(HIDDEN, HIDDEN), "k": dense(HIDDEN, HIDDEN),
                        "v": dense(HIDDEN, HIDDEN), "out": dense(HIDDEN, HIDDEN),
                        "ln1": layer_norm(), "ffn_in": dense(HIDDEN, FFN),
                        "ffn_out": dense(FFN, HIDDEN), "ln2": layer_norm()}
                       for _ in range(num_layers)]}


def _dense(x, p):
    return x @ p["w"] + p["b"]


def layer_norm(x, p, eps=1e-12):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + eps) * p["gamma"] + p["beta"]


def gelu(x):
    """The tanh approximation, as plain primitives (jax.nn.gelu(approximate=True))."""
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def softmax(x):
    e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
    return e / jnp.sum(e, axis=-1, keepdims=True)


def _attention(x, lp):
    b, s, _ = x.shape
    heads = lambda t: t.reshape(b, s, HEADS, HEAD_DIM)
    q, k, v = (heads(_dense(x, lp[n])) for n in ("q", "k", "v"))
    # Batched over (batch, head): scores (b, h, s, s), context (b, s, h, d).
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(HEAD_DIM)
    context = jnp.einsum("bhqk,bkhd->bqhd", softmax(scores), v)
    return _dense(context.reshape(b, s, HIDDEN), lp["out"])


def _layer(x, lp):
    x = layer_norm(x + _attention(x, lp), lp["ln1"])
    return layer_norm(x + _dense(gelu(_dense(x, lp["ffn_in"])), lp["ffn_out"]), lp["ln2"])


def build(num_layers: int, layout_name: str = "nhwc", batch: int = 1, seq: int = SEQ) -> Model:
    if layout_name not in LAYOUTS:
        raise ValueError(f"BERT has one form, (batch, seq, hidden) activations with (in, out) "
                         f"weights; got layout={layout_name!r}: pass layout='nhwc' (or omit it)")
    params = _init(num_layers)

    def apply(params, x):
        for lp in params["layers"]:
            x = _layer(x, lp)
        return x

    x = Params(seed=1).normal((batch, seq, HIDDEN), 1.0)
    name = "bert_layer" if num_layers == 1 else f"bert_{num_layers}"
    name += "" if seq == SEQ else f"_s{seq}"
    return Model(name, apply, params, (x,))
