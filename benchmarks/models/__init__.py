"""The model zoo: plain-JAX inference networks with deterministic random weights.

Entry points: MODELS (name -> builder), build(name, **kw) -> Model, forms(name, batch) ->
{program layout: Model}.
"""
from __future__ import annotations

from benchmarks.models.common import Model
from benchmarks.models import bert, gpt2, mobilenet_v2, resnet, tiny

MODELS = {
    "resnet18": lambda layout="nhwc", batch=1: resnet.build(18, layout, batch),
    "resnet50": lambda layout="nhwc", batch=1: resnet.build(50, layout, batch),
    "mobilenet_v2": lambda layout="nhwc", batch=1: mobilenet_v2.build(layout, batch),
    # BERT has only the (batch, seq, hidden) form: layout="nchw" raises ValueError.
    "bert_layer": lambda layout="nhwc", batch=1: bert.build(1, layout, batch),
    "bert_12": lambda layout="nhwc", batch=1: bert.build(12, layout, batch),
    "bert_layer_384": lambda layout="nhwc", batch=1: bert.build(1, layout, batch, seq=384),
    # GPT-2-small-style decoder block: a causal prompt of 128 or 512 tokens, and one token
    # decoded against a cache of 511 earlier ones (one form: layout="nchw" raises ValueError)
    "gpt2_block": lambda layout="nhwc", batch=1: _gpt2(layout, gpt2.build_prefill, 128, batch),
    "gpt2_block_512": lambda layout="nhwc", batch=1: _gpt2(layout, gpt2.build_prefill, 512,
                                                          batch),
    "gpt2_decode": lambda layout="nhwc", batch=1: _gpt2(layout, gpt2.build_decode, 511, batch),
    "tiny_cnn": lambda layout="nhwc", batch=1: tiny.build(layout, batch),  # runner smoke tests
}


def _gpt2(layout: str, builder, size: int, batch: int) -> Model:
    gpt2.check_layout(layout)
    return builder(size, batch)


def build(name: str, **kwargs) -> Model:
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}") from None
    return builder(**kwargs)


PROGRAM_LAYOUTS = ("nhwc", "nchw")


def forms(name: str, batch: int = 1) -> dict:
    """Every program layout the zoo builds name in: {layout: Model}. The forms compute the
    same network with their own random weights (drawn in each layout's shapes), so they
    time alike and each is checked against its own jax.jit."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    out = {}
    for layout in PROGRAM_LAYOUTS:
        try:
            out[layout] = build(name, layout=layout, batch=batch)
        except ValueError:  # a model without this form (BERT: one)
            continue
    return out
