"""The model zoo: plain-JAX inference networks with deterministic random weights.

Entry points: MODELS (name -> builder), build(name, **kw) -> Model.
"""
from __future__ import annotations

from benchmarks.models.common import Model
from benchmarks.models import resnet

MODELS = {
    "resnet18": lambda layout="nhwc", batch=1: resnet.build(18, layout, batch),
    "resnet50": lambda layout="nhwc", batch=1: resnet.build(50, layout, batch),
}


def build(name: str, **kwargs) -> Model:
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}") from None
    return builder(**kwargs)
