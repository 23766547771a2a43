"""benchmarks.onnx_export and the onnxruntime peer: small programs and whole models exported
to ONNX and run by onnxruntime must match jax.jit (rel. error <= 1e-4)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx)")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")

import onnx  # noqa: E402

from benchmarks import onnx_export, peers, timing  # noqa: E402

RTOL = 1e-4
_rng = np.random.default_rng(0)


def _n(*shape, scale=1.0):
    return jnp.asarray(_rng.standard_normal(shape).astype(np.float32) * scale)


def _check(fn, params, *inputs):
    model = onnx_export.export(fn, params, *inputs)
    onnx.checker.check_model(model)
    peer = peers.onnxruntime_peer(fn, params, *inputs, threads=1)
    got = peer(params, *inputs)
    want = jax.jit(fn)(params, *inputs)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    timing.check_close(getattr(fn, "__name__", "fn"), got, want, RTOL)


def _conv(dn, stride=1, pad=((1, 1), (1, 1)), dil=1, groups=1):
    return lambda p, x: lax.conv_general_dilated(x, p["w"], (stride, stride), pad,
                                                 rhs_dilation=(dil, dil),
                                                 dimension_numbers=dn,
                                                 feature_group_count=groups)


def _bn(p, x):
    return (x - p["mean"]) * lax.rsqrt(p["var"] + 1e-5) * p["gamma"] + p["beta"]


def _layernorm(p, x):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + 1e-6) * p["g"] + p["b"]


def _pool(p, x):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                             ((0, 0), (1, 1), (1, 1), (0, 0)))


def _avg_pool(p, x):
    return lax.reduce_window(x, 0.0, lax.add, (1, 1, 2, 2), (1, 1, 2, 2), "VALID") / 4


def _attention(p, x):  # (B, S, H, D) einsums: batch dims not first, softmax, merge heads
    q, k, v = (jnp.einsum("bsd,dhe->bshe", x, p[n]) for n in ("q", "k", "v"))
    s = jnp.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(8.0)
    o = jnp.einsum("bhqk,bkhe->bqhe", jax.nn.softmax(s, axis=-1), v)
    return o.reshape(o.shape[0], o.shape[1], -1) @ p["o"]


NHWC, NCHW = ("NHWC", "HWIO", "NHWC"), ("NCHW", "OIHW", "NCHW")
CASES = {
    "conv_nchw": (_conv(NCHW), {"w": _n(8, 4, 3, 3)}, _n(2, 4, 9, 9)),
    "conv_nhwc": (_conv(NHWC), {"w": _n(3, 3, 4, 8)}, _n(2, 9, 9, 4)),
    "conv_nhwc_stride2_asym": (_conv(NHWC, 2, ((0, 1), (2, 1))), {"w": _n(3, 3, 4, 8)},
                               _n(1, 10, 11, 4)),
    "conv_grouped_dilated": (_conv(NHWC, 1, ((2, 1), (1, 2)), dil=2, groups=2),
                             {"w": _n(3, 3, 3, 8)}, _n(1, 12, 12, 6)),
    "conv_depthwise_nhwc": (_conv(NHWC, 2, ((0, 1), (1, 0)), groups=8), {"w": _n(3, 3, 1, 8)},
                            _n(1, 12, 12, 8)),
    "conv_depthwise_nchw_dilated": (_conv(NCHW, 2, ((1, 2), (2, 1)), dil=2, groups=8),
                                    {"w": _n(8, 1, 3, 3)}, _n(1, 8, 13, 13)),
    "conv_mixed_layout": (lambda p, x: lax.conv_general_dilated(
        x, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "OIHW", "NCHW")),
        {"w": _n(5, 4, 3, 3)}, _n(1, 7, 7, 4)),
    "dot_plain": (lambda p, x: x @ p["w"] + p["b"], {"w": _n(16, 8), "b": _n(8)}, _n(4, 16)),
    "dot_3d_by_2d": (lambda p, x: x @ p["w"], {"w": _n(16, 8)}, _n(2, 5, 16)),
    "dot_transposed": (lambda p, x: lax.dot_general(x, p["w"], (((0,), (1,)), ((), ()))),
                       {"w": _n(8, 6)}, _n(6, 5)),
    "dot_batched_not_first": (lambda p, x: lax.dot_general(x, p["w"], (((0,), (2,)), ((2,), (0,)))),
                              {"w": _n(3, 7, 4)}, _n(4, 5, 3)),
    "dot_matvec": (lambda p, x: x @ p["v"], {"v": _n(16)}, _n(3, 16)),
    "attention": (_attention, {n: _n(16, 2, 8) for n in "qkv"} | {"o": _n(16, 16)},
                  _n(2, 6, 16)),
    "bn_affine_relu": (lambda p, x: jax.nn.relu(_bn(p, x)),
                       {"mean": _n(1, 1, 1, 8), "var": _n(1, 1, 1, 8) ** 2,
                        "gamma": _n(1, 1, 1, 8), "beta": _n(1, 1, 1, 8)}, _n(2, 5, 5, 8)),
    "relu6_clip": (lambda p, x: jax.nn.relu6(x * 4) + jnp.clip(x, -0.5, 0.5), {}, _n(2, 3, 4)),
    "max_pool_nhwc": (_pool, {}, _n(2, 9, 9, 3)),
    "avg_pool_nchw": (_avg_pool, {}, _n(2, 3, 8, 8)),
    "sum_pool_1d_padded": (lambda p, x: lax.reduce_window(x, 0.0, lax.add, (1, 3, 1), (1, 2, 1),
                                                          ((0, 0), (1, 2), (0, 0))), {},
                           _n(2, 9, 3)),
    "mean_spatial": (lambda p, x: jnp.mean(x, axis=(1, 2)), {}, _n(2, 7, 7, 8)),
    "softmax": (lambda p, x: jax.nn.softmax(x, axis=-1), {}, _n(3, 4, 10)),
    "layernorm": (_layernorm, {"g": _n(16), "b": _n(16)}, _n(2, 5, 16)),
    "gelu_tanh": (lambda p, x: jax.nn.gelu(x, approximate=True), {}, _n(4, 32)),
    "gelu_erf": (lambda p, x: jax.nn.gelu(x, approximate=False), {}, _n(4, 32)),
    "reshape_transpose_chain": (lambda p, x: jnp.transpose(
        x.reshape(2, 3, 4, 5), (0, 2, 1, 3)).reshape(8, 15)[None].squeeze(0).T, {}, _n(6, 20)),
    "elementwise_mix": (lambda p, x: (jnp.tanh(x) * jax.nn.sigmoid(x) - jnp.exp(-x ** 2)
                                      + jnp.maximum(x, 0.1) / (jnp.abs(x) + 1) + x ** 3
                                      + jnp.sqrt(jnp.abs(x)) ** 1.5 - jnp.minimum(x, 0.0)),
                        {}, _n(3, 7)),
    "concat_slice_pad_where": (lambda p, x: jnp.where(x > 0, jnp.concatenate(
        [x[:, 1:], jnp.pad(x[:, :1], ((0, 0), (0, 0)), constant_values=2.0)], 1), -x)
        .max(axis=0), {}, _n(4, 6)),
    "split_argmax_iota": (lambda p, x: [a.sum(1) + jnp.arange(3.0) for a in jnp.split(x, 2, 1)]
                          + [jnp.argmax(x, -1)], {}, _n(3, 8)),
    "take": (lambda p, i: jnp.take(p["table"], i, axis=0), {"table": _n(10, 4)},
             jnp.array([[1, 7], [0, 9]], jnp.int32)),
    "nested_jit_checkpoint": (lambda p, x: jax.jit(jax.checkpoint(
        lambda y: jnp.sin(y) @ p["w"]))(x), {"w": _n(5, 5)}, _n(2, 5)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_small_program(name):
    fn, params, *inputs = CASES[name]
    _check(fn, params, *inputs)


def test_unsupported_primitive_is_named():
    with pytest.raises(NotImplementedError, match="onnx_export: no rule for .*cholesky"):
        onnx_export.export(lambda p, x: jnp.linalg.cholesky(x), {}, jnp.eye(3))


def test_lhs_dilation_refused():
    fn = lambda p, x: lax.conv_general_dilated(x, p, (1, 1), ((1, 1), (1, 1)),
                                               lhs_dilation=(2, 2))
    with pytest.raises(NotImplementedError, match="conv_general_dilated.*lhs_dilation"):
        onnx_export.export(fn, _n(2, 2, 3, 3), _n(1, 2, 5, 5))


def test_peer_rejects_other_params_and_records_settings():
    fn, params, x = CASES["dot_plain"]
    peer = peers.onnxruntime_peer(fn, params, x, threads=1)
    assert peer.settings["intra_op_num_threads"] == 1
    assert peer.settings["inter_op_num_threads"] == 1
    peer({k: v.copy() for k, v in params.items()}, x)  # equal values are fine
    with pytest.raises(ValueError, match="params differ"):
        peer({k: v + 1 for k, v in params.items()}, x)
    assert peers.xla_peer(fn).settings["impl"] == "jax.jit"


def _model_cases():
    from benchmarks.models import MODELS

    cases = [("resnet18", {"layout": "nhwc"}), ("resnet18", {"layout": "nchw"}),
             ("mobilenet_v2", {"layout": "nhwc"}), ("bert_layer", {}), ("gpt2_block", {}),
             ("gpt2_decode", {})]
    return [pytest.param(name, kw, id=f"{name}-{kw.get('layout', '')}".rstrip("-"))
            for name, kw in cases if name in MODELS]


@pytest.mark.parametrize("name,kwargs", _model_cases())
def test_model_end_to_end(name, kwargs):
    from benchmarks.models import build

    model = build(name, **kwargs)
    _check(model.apply, model.params, *model.inputs)


def test_missing_onnxruntime_is_peer_unavailable(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    fn, params, x = CASES["dot_plain"]
    with pytest.raises(peers.PeerUnavailable, match="pip install onnx onnxruntime"):
        peers.onnxruntime_peer(fn, params, x)


def test_fold_canonicalises_for_ort_and_keeps_the_result():
    from benchmarks import onnx_fold
    from benchmarks.models import common

    layout = common.Layout("nchw")
    p = common.Params(0)
    params = {"w": p.conv(layout, 3, 3, 4, 8), "bn": p.batch_norm(8)}

    def f(params, x):
        y = common.batch_norm(common.conv(x, params["w"], layout), params["bn"], layout)
        return jnp.minimum(jax.nn.relu(y), 6.0), jax.nn.relu(y) / 2.0

    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    model = onnx_export.export(f, params, x)
    folded = onnx_fold.fold(model)
    ops = [n.op_type for n in folded.graph.node]
    assert "Sub" not in ops and "Div" not in ops and "Sqrt" not in ops and "Reshape" not in ops
    assert "Clip" in ops and "Relu" in ops and "Max" not in ops
    assert len(ops) < len(model.graph.node)
    import onnxruntime

    session = onnxruntime.InferenceSession(folded.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    got = session.run(None, {"x0": x})
    for g, w in zip(got, jax.jit(f)(params, x)):
        np.testing.assert_allclose(g, np.asarray(w), rtol=1e-5, atol=1e-5)
