"""The implementations a benchmark times side by side with alt_jax, each a callable taking the
jax function's own arguments and carrying the thread settings it ran with.

Entry points: Peer, xla_peer(fn), xla_eigen_peer(fn, *args), onnxruntime_peer(fn, params,
*inputs, threads, spinning), PeerUnavailable.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import numpy as np


class PeerUnavailable(RuntimeError):
    """A peer cannot run here (a missing package); the runner reports it and goes on."""


@dataclasses.dataclass(frozen=True)
class Peer:
    name: str
    fn: Callable
    settings: dict  # what the runner prints next to the timings: threads, options, versions

    def __call__(self, *args):
        return self.fn(*args)


def xla_peer(fn: Callable) -> Peer:
    """jax.jit(fn); XLA:CPU runs intra-op work on its own pool of one thread per core."""
    settings = {"impl": "jax.jit", "jax": jax.__version__, "intra_op_threads": os.cpu_count(),
                "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
    return Peer("xla", jax.jit(fn), settings)


# XLA:CPU's default path goes through YNNPACK; this option sends it down its older Eigen
# path, which is faster on this machine (ANCHORS.md: ResNet-50 NHWC 73 vs 129 ms).
EIGEN_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def xla_eigen_peer(fn: Callable, *args) -> Peer:
    """jax.jit(fn) compiled for these args' shapes with XLA's legacy Eigen path."""
    compiled = jax.jit(fn).lower(*args).compile(compiler_options=EIGEN_OPTIONS)
    settings = {"impl": "jax.jit (eigen)", "jax": jax.__version__,
                "intra_op_threads": os.cpu_count(), "compiler_options": EIGEN_OPTIONS}
    return Peer("xla_eigen", compiled, settings)


def _import_onnxruntime():
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as e:
        raise PeerUnavailable(f"onnxruntime is not installed: pip install onnx onnxruntime "
                              f"({e})") from e
    return onnxruntime


def _same_params(expected, got) -> bool:
    if got is expected:
        return True
    e_leaves, e_tree = jax.tree_util.tree_flatten(expected)
    g_leaves, g_tree = jax.tree_util.tree_flatten(got)
    return e_tree == g_tree and all(
        np.shape(a) == np.shape(b) and np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(e_leaves, g_leaves))


def onnxruntime_peer(fn: Callable, params, *inputs, threads: int | None = None,
                     spinning: bool = False) -> Peer:
    """fn exported to ONNX (params baked in as initializers) and run by an onnxruntime
    InferenceSession on CPU; call it as fn(params, *inputs) and get numpy outputs.

    The params passed at call time must be the ones exported: the same object costs nothing,
    another one is compared leaf by leaf and a difference is a ValueError.
    """
    ort = _import_onnxruntime()
    from benchmarks import onnx_export

    threads = os.cpu_count() if threads is None else int(threads)
    from benchmarks import onnx_fold

    conversion = onnx_export.convert(fn, params, *inputs)
    # Fold constants and canonicalise as a deployment exporter would, so ORT's own fusions
    # (BN into Conv, Conv+Relu, NCHWc) apply: ResNet-50 70 -> 47 ms here.
    conversion = dataclasses.replace(conversion, model=onnx_fold.fold(conversion.model))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT's pool threads spin for work by default and keep doing so between runs, so in an
    # interleaved benchmark they take the cores from whatever is timed next, pauses or not
    # (jax.jit's BERT layer: 13.8 ms beside a non-spinning ORT, 16.5-23 ms beside a spinning
    # one). Off by default; it costs ORT itself ~5-10% (BERT layer 12.5 -> 13.4 ms).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    providers = ["CPUExecutionProvider"]
    session = ort.InferenceSession(conversion.model.SerializeToString(), options,
                                   providers=providers)
    from onnx import helper
    in_dtypes = [helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
                 for v in conversion.model.graph.input]
    names = conversion.input_names

    def run(call_params, *call_inputs):
        if not _same_params(params, call_params):
            raise ValueError("onnxruntime peer: params differ from the ones baked into the "
                             "ONNX graph; build a new peer for new weights")
        leaves = jax.tree_util.tree_leaves(call_inputs)
        feed = {n: np.asarray(x, d) for n, x, d in zip(names, leaves, in_dtypes)}
        outs = session.run(list(conversion.output_names), feed)
        return jax.tree_util.tree_unflatten(conversion.out_tree, outs)

    settings = {"impl": "onnxruntime", "onnxruntime": ort.__version__,
                "intra_op_num_threads": threads, "inter_op_num_threads": 1,
                "execution_mode": "ORT_SEQUENTIAL", "graph_optimization_level": "ORT_ENABLE_ALL",
                "intra_op.allow_spinning": spinning,
                "providers": providers, "opset": onnx_export.OPSET,
                "nodes": len(conversion.model.graph.node)}
    return Peer("onnxruntime", run, settings)
