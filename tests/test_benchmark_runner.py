"""The benchmark runner end to end on a tiny model (1 repeat), and its refusal to time an
implementation whose output is wrong."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from benchmarks import models, run, suites, timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_runner_smoke_tiny_model(tmp_path):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    env = dict(os.environ, ALT_JAX_CACHE_DIR=str(tmp_path / "kernels"))
    cmd = [sys.executable, "-m", "benchmarks.run", "--suite=models", "--models=tiny_cnn",
           "--layouts=nhwc,nchw", "--repeat=1", "--min_round_ms=1",
           "--peers=xla,onnxruntime,openvino", "--ablations",
           f"--json_out={out_json}", f"--plot_out={out_png}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "alt_jax vs jax.jit: geomean" in proc.stdout
    report = json.loads(out_json.read_text())
    assert report["machine"]["fma_peak_gflops"] > 0 and report["machine"]["cores"] >= 1
    assert {"jax", "alt_jax"} <= set(report["machine"]["versions"])
    assert [r["workload"] for r in report["rows"]] == ["tiny_cnn-nhwc", "tiny_cnn-nchw"]
    have_ort = importlib.util.find_spec("onnxruntime") is not None
    have_ov = importlib.util.find_spec("openvino") is not None
    for row in report["rows"]:
        assert row["flops"] == models.build("tiny_cnn").flops
        ours = row["impls"]["alt_jax"]
        assert ours["median_ms"] > 0 and ours["pct_peak"] > 0
        assert "jax.jit" in ours["speedup_vs"]
        assert ("onnxruntime" in ours["speedup_vs"]) == have_ort
        assert ("OpenVINO" in ours["speedup_vs"]) == have_ov
        for peer in ("jax.jit", "onnxruntime", "OpenVINO"):  # each on its faster form
            if peer in row["impls"]:
                chosen = row["impls"][peer]
                times = chosen["selection_ms"]  # (rounded: two forms may tie)
                assert times[chosen["program_layout"]] == min(times.values())
        assert row["alt_jax_ops_on_kernels"][1] == 3
        assert {f"alt_jax ({a})" for a in ("no propagation", "no fusion", "no weight packing",
                                           "no attention kernel", "no Winograd")
                } <= set(row["impls"])
    assert "jax.jit" in report["thread_settings"]
    if importlib.util.find_spec("matplotlib") is not None:
        assert out_png.stat().st_size > 1000
    if not have_ort:
        assert "onnxruntime is not installed" in proc.stdout
    if not have_ov:
        assert "OpenVINO is not installed" in proc.stdout
    assert "OpenVINO ran" in proc.stdout or not have_ov


def test_a_wrong_output_is_an_error_not_a_row(monkeypatch):
    model = models.build("tiny_cnn")
    wrong = lambda params, x: jax.jit(model.apply)(params, x) * 1.01
    monkeypatch.setattr(run, "implementations",
                        lambda m, *a: {"jax.jit": jax.jit(m.apply), "alt_jax": wrong})
    with pytest.raises(timing.MismatchError, match="rel err"):
        run.run_workloads([(model, 1)], timing.MeasureConfig(repeat=1), [], None, 100.0,
                          1e-4, [], {})


def test_op_suites_report_multiplicity_and_flops():
    ops = suites.build_suite("resnet50_convs")
    assert sum(count for _, count in ops) == 54  # 53 convs + the classifier's matmul
    assert sum(m.flops * count for m, count in ops) == models.build("resnet50").flops
    literature = {m.name.split()[0] for m, _ in suites.build_suite("literature")}
    assert literature == {"C2D", "GRP", "DEP", "DIL", "GMM", "TBG"}
    with pytest.raises(ValueError, match="choose from"):
        suites.build_suite("nope")


def test_xla_eigen_peer_matches_jax_jit():
    from benchmarks import peers
    model = models.build("tiny_cnn")
    args = (model.params, *model.inputs)
    eigen = peers.xla_eigen_peer(model.apply, *args)
    timing.check_close("eigen", eigen(*args), jax.jit(model.apply)(*args), 1e-5)
    assert eigen.settings["compiler_options"] == peers.EIGEN_OPTIONS


def test_family_table_drops_only_the_excluded_family():
    from jax import lax

    from alt_jax.ops import registry
    full = registry.family_table()
    without = registry.family_table(exclude=("winograd",))
    conv = lax.conv_general_dilated_p
    assert [f.name for f in full[conv]] == ["depthwise", "winograd", "conv2d"]
    assert [f.name for f in without[conv]] == ["depthwise", "conv2d"]
    assert without[lax.dot_general_p] == full[lax.dot_general_p]


def test_others_load_sees_another_process_holding_a_core():
    import subprocess
    import sys
    import time

    from benchmarks import timing

    busy = subprocess.Popen([sys.executable, "-c",
                             "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"])
    try:
        time.sleep(0.3)  # let it start
        with timing.OthersLoad() as load:
            time.sleep(0.8)
    finally:
        busy.wait()
    # one busy process on this machine's cores: about 1 / cores of it, more if others run
    assert load.others_share + load.steal_share >= 0.6 / (os.cpu_count() or 1)


def test_tuned_columns_per_run_kind_and_the_per_op_ablation(tmp_path, monkeypatch):
    """Records of a joint and a loop-only run give one column each, every op of the tuned
    plans on tuned knobs, a per-op table, and tuned_ops times each op's variants."""
    from alt_jax import records, runtime
    from benchmarks import tuned_ops
    from benchmarks.tuning_runs import tuning_runs
    from tuner.cli import bound_workloads
    from tuner.tune import TuneOptions, tune

    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # run_workloads reads benchmarks.run's flag defaults
    monkeypatch.setenv("ALT_JAX_CACHE_DIR", str(tmp_path / "kernels"))  # never the user's
    model = models.build("tiny_cnn")
    path = tmp_path / "rec.jsonl"
    cache = runtime.KernelCache(tmp_path / "kernels")
    for mode in ("joint", "loop_only"):
        tune(bound_workloads(model), records.RecordStore(path),
             TuneOptions(trials=6, batch=2, mode=mode, model="tiny"), cache=cache)
    assert [label for label, _ in tuning_runs(str(path))] == ["joint tuned",
                                                                   "loop-only tuned"]
    rows = run.run_workloads([(model, 1)], timing.MeasureConfig(repeat=1, min_round_ms=1),
                             ["xla"], str(path), 100.0, 1e-4, [], {})
    (row,) = rows
    for name in ("alt_jax tuned", "alt_jax joint tuned", "alt_jax loop-only tuned"):
        tuned, on_kernels = row["impls"][name]["ops_tuned"]
        assert tuned == on_kernels == row["alt_jax_ops_on_kernels"][0] > 0
        assert row["impls"][name]["speedup_vs"]["alt_jax"] > 0
    assert {op["from"] for op in row["per_op"]} == {"tuned"}
    assert row["graph_vs_fixed_nhwc"] > 0 and row["joint_vs_loop_only"] > 0  # same rounds
    assert "joint vs loop-only" in run.format_table(rows)
    assert "vs untuned alt_jax: tuned" in run.format_table(rows)
    op_rows = tuned_ops.op_rows(model, str(path), rounds=2, min_repeat_s=1e-3)
    assert len(op_rows) == 2 and all(
        set(r["ms"]) == {"untuned", "joint tuned", "loop-only tuned"} for r in op_rows)
    assert "whole model" in tuned_ops.format_rows(op_rows)


def test_openvino_peer_matches_jax_jit_and_sends_nothing():
    if importlib.util.find_spec("openvino") is None:  # not importorskip: the peer imports it
        pytest.skip("OpenVINO is an optional benchmark peer: pip install openvino")
    from benchmarks import peers
    model = models.build("tiny_cnn", layout="nchw")
    args = (model.params, *model.inputs)
    ov = peers.openvino_peer(model.apply, model.params, *model.inputs)
    got = ov(*args)
    timing.check_close("openvino", got, jax.jit(model.apply)(*args), 1e-5)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    assert ov.settings["PERFORMANCE_HINT"] == "LATENCY"
    assert ov.settings["INFERENCE_NUM_THREADS"] == os.cpu_count()
    assert "32" in ov.settings["INFERENCE_PRECISION_HINT"]  # f32: no bf16 down-conversion
    assert sys.modules["openvino_telemetry"] is None  # openvino's no-op stub, no fork
    other = jax.tree_util.tree_map(lambda a: a + 1, model.params)
    with pytest.raises(ValueError, match="OpenVINO peer: params differ"):
        ov(other, *model.inputs)


def _sleeper(name, seconds, out):
    import time

    def run(params, x):
        time.sleep(seconds)
        return out
    from benchmarks import peers
    return peers.Peer(name, run, {"impl": name})


def test_each_peer_runs_the_form_it_is_faster_on(monkeypatch):
    from benchmarks import peer_forms
    forms = models.forms("tiny_cnn")
    assert set(forms) == {"nhwc", "nchw"} and set(models.forms("bert_layer")) == {"nhwc"}
    delay = {"nhwc": 0.004, "nchw": 0.0}
    monkeypatch.setattr(peer_forms, "build_peer", lambda key, model, spinning=False: _sleeper(
        key, delay[model.name.split("-")[1]], model.name))
    fast = timing.MeasureConfig(warmup=0, repeat=3, min_round_ms=1)
    peer = peer_forms.on_best_form("openvino", forms, "nhwc", fast)
    assert isinstance(peer, peer_forms.FormPeer) and peer.form is forms["nchw"]
    assert peer(*forms["nhwc"].inputs) == "tiny_cnn-nchw"  # the row's args: its own form's
    assert peer.settings["program_layout"] == "nchw"
    assert peer.settings["selection_ms"]["nhwc"] > peer.settings["selection_ms"]["nchw"]
    delay.update(nhwc=0.0, nchw=0.004)
    same = peer_forms.on_best_form("openvino", forms, "nhwc", fast)
    assert not isinstance(same, peer_forms.FormPeer) and same(None, None) == "tiny_cnn-nhwc"
    assert same.settings["program_layout"] == "nhwc"
    alone = peer_forms.on_best_form("openvino", {"nhwc": forms["nhwc"]}, "nhwc", fast)
    assert alone.settings["program_layout"] == "nhwc" and "selection_ms" not in alone.settings


def test_a_peer_on_another_form_is_checked_against_that_form():
    """A peer running the NCHW program for an NHWC row answers for the NCHW weights: it is
    checked against jax.jit of that form, and a wrong answer there is still an error."""
    import dataclasses

    from benchmarks import peer_forms, peers
    forms = models.forms("tiny_cnn")
    nchw = jax.jit(forms["nchw"].apply)
    right = peer_forms.FormPeer(peers.Peer("p", nchw, {}), forms["nchw"], {})
    wrong = dataclasses.replace(right, peer=peers.Peer("p", lambda *a: nchw(*a) * 1.01, {}))
    own = {"jax.jit": jax.jit(forms["nhwc"].apply)}
    run.check_outputs(forms["nhwc"], {**own, "p": right}, 1e-4)
    with pytest.raises(timing.MismatchError, match=r"\[p\]"):
        run.check_outputs(forms["nhwc"], {**own, "p": wrong}, 1e-4)
