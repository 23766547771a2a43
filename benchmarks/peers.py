"""The implementations a benchmark times side by side with alt_jax, each a callable taking the
jax function's own arguments and carrying the thread settings it ran with.

Entry points: Peer, xla_peer(fn), xla_eigen_peer(fn, *args), onnxruntime_peer(fn, params,
*inputs, threads, spinning), openvino_peer(fn, params, *inputs, threads), PeerUnavailable.
"""
from __future__ import annotations

import dataclasses
import os
import sys
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


def _folded_onnx(fn: Callable, params, *inputs):
    """fn(params, *inputs) exported to ONNX with params as initializers, constants folded and
    canonicalised as a deployment exporter would, so that each runtime's own fusions (BN into
    Conv, Conv+Relu, blocked layouts) apply: ORT's ResNet-50 70 -> 47 ms here."""
    from benchmarks import onnx_export, onnx_fold

    conversion = onnx_export.convert(fn, params, *inputs)
    return dataclasses.replace(conversion, model=onnx_fold.fold(conversion.model))


def _feeder(peer_name: str, params, conversion):
    """call(call_params, *call_inputs) -> {input name: numpy array}, refusing other params:
    the ones exported are baked into the graph (the same object costs nothing, another is
    compared leaf by leaf)."""
    from onnx import helper

    in_dtypes = [helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
                 for v in conversion.model.graph.input]

    def feed(call_params, *call_inputs):
        if not _same_params(params, call_params):
            raise ValueError(f"{peer_name} peer: params differ from the ones baked into the "
                             f"ONNX graph; build a new peer for new weights")
        leaves = jax.tree_util.tree_leaves(call_inputs)
        return {n: np.asarray(x, d)
                for n, x, d in zip(conversion.input_names, leaves, in_dtypes)}
    return feed


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
    conversion = _folded_onnx(fn, params, *inputs)
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
    feed = _feeder("onnxruntime", params, conversion)

    def run(call_params, *call_inputs):
        outs = session.run(list(conversion.output_names), feed(call_params, *call_inputs))
        return jax.tree_util.tree_unflatten(conversion.out_tree, outs)

    settings = {"impl": "onnxruntime", "onnxruntime": ort.__version__,
                "intra_op_num_threads": threads, "inter_op_num_threads": 1,
                "execution_mode": "ORT_SEQUENTIAL", "graph_optimization_level": "ORT_ENABLE_ALL",
                "intra_op.allow_spinning": spinning,
                "providers": providers, "opset": onnx_export.OPSET,
                "nodes": len(conversion.model.graph.node)}
    return Peer("onnxruntime", run, settings)


def _import_openvino():
    # Importing openvino sends a usage event through openvino_telemetry, which fork()s a
    # process to post it: in a process running jax's threads a fork can deadlock the child
    # (the parent waits out a timeout), and a benchmark has no business phoning home. Where
    # that package is missing, openvino falls back to its own no-op stub: make it missing
    # for this process (unless something imported it already).
    sys.modules.setdefault("openvino_telemetry", None)
    try:
        import onnx  # noqa: F401
        import openvino
    except ImportError as e:
        raise PeerUnavailable(f"OpenVINO is not installed: pip install onnx openvino ({e})") from e
    return openvino


def openvino_peer(fn: Callable, params, *inputs, threads: int | None = None) -> Peer:
    """fn exported to the same folded ONNX graph as onnxruntime's, compiled by OpenVINO's CPU
    plugin for latency (one stream, `threads` inference threads, f32 inference precision: no
    bf16/fp16 down-conversion, so its answers are checked like every peer's); call it as
    fn(params, *inputs) and get numpy outputs. Params as for onnxruntime_peer."""
    ov = _import_openvino()
    from benchmarks import onnx_export

    threads = os.cpu_count() if threads is None else int(threads)
    conversion = _folded_onnx(fn, params, *inputs)
    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
              "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1}
    compiled = core.compile_model(core.read_model(conversion.model.SerializeToString()),
                                  "CPU", config)
    request = compiled.create_infer_request()
    feed = _feeder("OpenVINO", params, conversion)
    outputs = [compiled.output(i) for i in range(len(compiled.outputs))]
    if len(outputs) != len(conversion.output_names):
        raise RuntimeError(f"OpenVINO compiled {len(outputs)} outputs for an ONNX graph with "
                           f"{len(conversion.output_names)}")

    def run(call_params, *call_inputs):
        result = request.infer(feed(call_params, *call_inputs))
        # copies: the request reuses its output buffers on the next call
        outs = [np.array(result[o]) for o in outputs]
        return jax.tree_util.tree_unflatten(conversion.out_tree, outs)

    settings = {"impl": "OpenVINO", "openvino": ov.__version__, "device": "CPU",
                **{k: compiled.get_property(k) for k in config}, "opset": onnx_export.OPSET,
                "nodes": len(conversion.model.graph.node)}
    return Peer("openvino", run, {k: str(v) if not isinstance(v, (int, float, bool)) else v
                                  for k, v in settings.items()})
