"""A GPT-2-small-style decoder block (Radford et al. 2019), inference: pre-LayerNorm, one
fused QKV projection split three ways, causal self-attention, tanh-GELU MLP. Entry points:
build_prefill(seq, batch) -> Model (the block over a prompt of `seq` tokens) and
build_decode(cache, batch) -> Model (one new token attending to a KV cache of `cache`
earlier positions and itself; it returns the block's output and the token's keys and
values, which a generation loop appends to the cache).

Hidden 768, 12 heads of 64, MLP 3072; activations (batch, seq, hidden) float32; the cache is
(batch, cache, heads, head size) for keys and values alike.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from benchmarks.models.common import Model, Params

HIDDEN, HEADS, MLP = 768, 12, 3072
HEAD_DIM = HIDDEN // HEADS


def _init(seed: int = 0) -> dict:
    p = Params(seed)

    def dense(n_in, n_out):
        return {"w": p.normal((n_in, n_out), 0.02), "b": p.normal((n_out,), 0.02)}

    def layer_norm():
        return {"gamma": p.uniform((HIDDEN,), 0.8, 1.2), "beta": p.normal((HIDDEN,), 0.02)}

    return {"ln1": layer_norm(), "qkv": dense(HIDDEN, 3 * HIDDEN), "proj": dense(HIDDEN, HIDDEN),
            "ln2": layer_norm(), "fc": dense(HIDDEN, MLP), "fc_out": dense(MLP, HIDDEN)}


def _dense(x, p):
    return x @ p["w"] + p["b"]


def _layer_norm(x, p, eps=1e-5):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["gamma"] + p["beta"]


def _qkv(h, p):
    b, s, _ = h.shape
    q, k, v = jnp.split(_dense(h, p["qkv"]), 3, axis=-1)
    return tuple(t.reshape(b, s, HEADS, HEAD_DIM) for t in (q, k, v))


def _attend(q, k, v, mask):
    """softmax(q k^T / sqrt(d), masked) v over (batch, seq, heads, head size) arrays; mask
    (q positions, k positions) bool or None. Masked scores are the float32 minimum, as
    Hugging Face's GPT-2 writes them."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(HEAD_DIM)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


def _mlp(x, p):
    h = _layer_norm(x, p["ln2"])
    return x + _dense(jax.nn.gelu(_dense(h, p["fc"]), approximate=True), p["fc_out"])


def build_prefill(seq: int = 128, batch: int = 1) -> Model:
    params = _init()

    def apply(params, x):
        b, s, _ = x.shape
        q, k, v = _qkv(_layer_norm(x, params["ln1"]), params)
        causal = jnp.tril(jnp.ones((s, s), bool))
        a = _attend(q, k, v, causal).reshape(b, s, HIDDEN)
        return _mlp(x + _dense(a, params["proj"]), params)

    x = Params(seed=1).normal((batch, seq, HIDDEN), 1.0)
    return Model(f"gpt2_block_s{seq}", apply, params, (x,))


def build_decode(cache: int = 511, batch: int = 1) -> Model:
    params = _init()

    def apply(params, x, k_cache, v_cache):
        b = x.shape[0]
        q, k, v = _qkv(_layer_norm(x, params["ln1"]), params)
        keys = jnp.concatenate([k_cache, k], axis=1)      # every earlier position, and this
        values = jnp.concatenate([v_cache, v], axis=1)
        a = _attend(q, keys, values, None).reshape(b, 1, HIDDEN)
        return _mlp(x + _dense(a, params["proj"]), params), k, v

    inputs = Params(seed=1)
    x = inputs.normal((batch, 1, HIDDEN), 1.0)
    kv = tuple(inputs.normal((batch, cache, HEADS, HEAD_DIM), 1.0) for _ in range(2))
    return Model(f"gpt2_decode_c{cache + 1}", apply, params, (x, *kv))


LAYOUTS = ("nhwc",)  # one form, as BERT (benchmarks.models.forms)


def check_layout(layout_name: str) -> None:
    if layout_name not in LAYOUTS:
        raise ValueError(f"GPT-2 has one form, (batch, seq, hidden) activations with (in, out) "
                         f"weights; got layout={layout_name!r}: pass layout='nhwc' (or omit it)")

