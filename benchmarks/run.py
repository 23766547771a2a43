"""The benchmark runner: whole models or op suites, jax.jit / onnxruntime / OpenVINO / alt_jax
side by side, interleaved in one process, outputs checked against jax.jit before anything is
timed. For a zoo model built in several program layouts, each peer runs the one it runs
best (benchmarks.peer_forms) and the table says which.

Run: python -m benchmarks.run --suite=models --models=resnet50,mobilenet_v2 \\
         --peers=xla,onnxruntime,openvino [--records=FILE] [--repeat=N] [--json_out=F]
         [--plot_out=F.png]
     python -m benchmarks.run --suite=ops --ops=issue2,literature,resnet50_convs
Entry points: main (absl), run_workloads(workloads, ...) -> list of row dicts.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys

import jax
from absl import app, flags

import alt_jax
from alt_jax import _core, device
from alt_jax.ops import registry
from alt_jax.records import RecordStore
from benchmarks import models, peer_forms, peers, suites, timing
from benchmarks.tuning_runs import tuning_runs

FLAGS = flags.FLAGS
flags.DEFINE_enum("suite", "models", ["models", "ops"], "whole models or op suites")
flags.DEFINE_list("models", ["resnet18", "resnet50", "mobilenet_v2", "bert_layer"],
                  f"models for --suite=models: {sorted(models.MODELS)}")
flags.DEFINE_list("layouts", ["nhwc"], "program layouts to build each model in (nhwc, nchw); "
                  "a model without that layout is skipped with a message")
flags.DEFINE_list("ops", ["issue2"], f"op suites for --suite=ops: {sorted(suites.SUITES)}")
flags.DEFINE_list("only", [], "run only workloads whose name contains one of these")
flags.DEFINE_list("peers", ["xla", "onnxruntime"],
                  "peers beside alt_jax: xla (jax.jit, always timed), onnxruntime, openvino, "
                  "xla_eigen (jax.jit with XLA's legacy Eigen path)")
flags.DEFINE_enum("peer_forms", "best", ["best", "own"],
                  "best: for a zoo model with several program layouts (NHWC, NCHW), each peer "
                  "runs the one it is fastest on in a few selection rounds (the table says "
                  "which; alt_jax runs the row's own); own: every peer runs the row's program")
flags.DEFINE_bool("ort_spinning", False, "let onnxruntime's threads spin (its default): "
                  "faster for ORT alone, but they take the cores from the other implementations")
flags.DEFINE_string("records", None, "tuning records (alt-tune): adds an 'alt_jax tuned' "
                    "column (the best record of any tuning run), and when the file holds runs "
                    "of several modes / searches, one column per run kind: 'joint tuned', "
                    "'loop-only tuned' (layouts fixed at the heuristic's), '... (random "
                    "search)'")
flags.DEFINE_bool("prepare", True, "alt_jax binds each workload's weights with prepare(), so "
                  "they are packed once (as onnxruntime's session does); jax.jit still takes "
                  "them as arguments. --noprepare passes them as arguments to alt_jax too")
flags.DEFINE_bool("ablations", False, "add alt_jax columns with one optimisation off: no "
                  "layout propagation, no epilogue fusion, no weight packing, no attention "
                  "kernel (its two products on the matmul kernels, the softmax in XLA), no "
                  "row-wise kernel (layer norms in XLA), no Winograd (3x3 convs on the direct "
                  "template)")
flags.DEFINE_bool("graph_ablation", True, "with --records: add 'alt_jax tuned, fixed NHWC' "
                  "(op-tuned kernels on every conv writing channels-last) beside 'alt_jax "
                  "tuned' (which replays the graph tuner's layout plan stored with the records)")
flags.DEFINE_integer("batch", 1, "batch size for models")
flags.DEFINE_integer("repeat", 10, "interleaved timing rounds per workload")
flags.DEFINE_float("min_round_ms", 50.0, "minimum duration of one round per implementation")
flags.DEFINE_float("rtol", 1e-4, "max relative error vs jax.jit; above it the run fails")
flags.DEFINE_string("json_out", None, "write machine info and all rows as JSON here")
flags.DEFINE_string("plot_out", None, "write a PNG bar chart of alt_jax's speedups here")


def machine_info(peak_gflops: float, threads: int) -> dict:
    versions = {"python": platform.python_version(), "jax": jax.__version__,
                "alt_jax": alt_jax.__version__}
    for mod in ("jaxlib", "numpy", "onnxruntime", "onnx", "openvino"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    isa = device.detect_isa()
    return {"cpu": device.fingerprint(), "isa": isa.name, "cores": os.cpu_count(),
            "fma_peak_gflops": round(peak_gflops, 1), "threads": threads,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions}


def _alt_jax(model, **options):
    """alt_jax on the workload, called like it: fn(params, *inputs)."""
    optimized = alt_jax.optimize(jax.jit(model.apply), fallback="silent", **options)
    if not FLAGS.prepare:
        return optimized
    prepared = optimized.prepare(model.params)

    def call(params, *inputs):
        if params is not model.params:
            raise ValueError("prepared alt_jax was built for the workload's own params")
        return prepared(*inputs)
    call.plan_for = lambda params, *inputs: prepared.plan_for(*inputs)
    return call


def implementations(model, wanted_peers, records, notes: list, forms=None) -> dict:
    """Each implementation's callable, taking the workload's (params, *inputs). forms: the
    model's program layouts ({layout: Model}, its own included), where peers may run
    another one (--peer_forms=best)."""
    forms = forms if forms and FLAGS.peer_forms == "best" else {}
    own = next((layout for layout, m in forms.items() if m.name == model.name), None)
    if own is None:
        forms, own = {"own": model}, "own"
    impls = {}
    for key in ["xla"] + [k for k in peer_forms.PEER_COLUMNS if k != "xla" and k in wanted_peers]:
        try:
            impls[peer_forms.PEER_COLUMNS[key]] = peer_forms.on_best_form(
                key, forms, own, spinning=FLAGS.ort_spinning)
        except peers.PeerUnavailable as e:
            if str(e) not in notes:
                notes.append(str(e))
    impls["alt_jax"] = _alt_jax(model, records=False)
    if records:
        impls["alt_jax tuned"] = _alt_jax(model, records=records)
        if FLAGS.graph_ablation:
            # the same op-level records on today's fixed rule (every conv channels-last):
            # "alt_jax tuned" replays the graph tuner's layout plan when records hold one
            impls["alt_jax tuned, fixed NHWC"] = _alt_jax(model, records=records,
                                                          layout_plan="NHWC")
        for label, select in tuning_runs(records):
            # a loop-only run keeps today's fixed layouts between kernels too (the graph
            # tuner's plan stored with the records is the joint run's)
            fixed = dict(layout_plan="NHWC") if select["mode"] == "loop_only" else {}
            impls[f"alt_jax {label}"] = _alt_jax(model, records=RecordStore(records, select),
                                                 **fixed)
    if FLAGS.ablations:
        for label, options in (("no propagation", dict(propagate=False)),
                               ("no fusion", dict(fuse=False)),
                               ("no weight packing", dict(pack_weights=False)),
                               ("no attention kernel", dict(attention=False)),
                               ("no row-wise kernel", dict(rownorm=False)),
                               ("no Winograd", dict(families=registry.family_table(
                                   exclude=("winograd",))))):
            impls[f"alt_jax ({label})"] = _alt_jax(model, records=False, **options)
        for choice in ("NC8", "NC16"):  # every conv writes channel blocks (heuristic knobs)
            impls[f"alt_jax (all {choice})"] = _alt_jax(model, records=False, layout_plan=choice)
    return impls


def check_outputs(model, impls, rtol: float) -> None:
    """Every implementation's answer on the workload's arguments against jax.jit of the
    program it runs (a peer on another program layout: that form's own); a mismatch is an
    error (timing.MismatchError), never a row."""
    args = (model.params, *model.inputs)
    want = jax.jit(model.apply)(*args)
    for name, fn in impls.items():
        form = getattr(fn, "form", None)
        timing.check_close(f"{model.name} [{name}]", fn(*args),
                           jax.jit(form.apply)(form.params, *form.inputs) if form else want,
                           rtol)


def run_workloads(workloads, config: timing.MeasureConfig, wanted_peers, records, peak,
                  rtol: float, notes: list, settings: dict) -> list:
    """Measures each (model, count); fills settings with each implementation's threads."""
    rows = []
    for model, count, *forms in workloads:
        args = (model.params, *model.inputs)
        impls = implementations(model, wanted_peers, records, notes, *forms)
        for name, fn in impls.items():
            settings.setdefault(name, getattr(fn, "settings", None) or
                                {"impl": name, "threads": "XLA's intra-op pool (kernels use it)"})
        check_outputs(model, impls, rtol)
        with timing.OthersLoad() as load:
            t = timing.interleaved(impls, args, config)
        flops = model.flops
        row = {"workload": model.name, "count": count, "flops": flops, "impls": {},
               "others_cpu_share": load.others_share, "steal_share": load.steal_share}
        if load.others_share + load.steal_share > 0.05:  # a core lost costs alt_jax most
            notes.append(f"{model.name}: other processes took "
                         f"{100 * (load.others_share + load.steal_share):.0f}% of the "
                         f"machine while it was timed; its times are not representative")
        for name, tm in t.items():
            row["impls"][name] = {"median_ms": tm.median * 1e3, "min_ms": tm.low * 1e3,
                                  "max_ms": tm.high * 1e3,
                                  "gflops": flops / tm.median / 1e9,
                                  "pct_peak": 100 * flops / tm.median / 1e9 / peak}
            peer_settings = getattr(impls[name], "settings", None) or {}
            if "program_layout" in peer_settings:
                row["impls"][name]["program_layout"] = peer_settings["program_layout"]
                if "selection_ms" in peer_settings:
                    row["impls"][name]["selection_ms"] = peer_settings["selection_ms"]
        # the graph level (issue 10's ablations), each pair in the same rounds
        for key, (a, b) in {"graph_vs_fixed_nhwc": ("alt_jax tuned", "alt_jax tuned, fixed NHWC"),
                            "joint_vs_loop_only": ("alt_jax joint tuned",
                                                   "alt_jax loop-only tuned")}.items():
            if a in t and b in t:
                row[key] = timing.median_ratio(t[b], t[a])
        for ours in [n for n in t if n.startswith("alt_jax")]:
            if ours in t:
                row["impls"][ours]["speedup_vs"] = {
                    peer: timing.median_ratio(t[peer], t[ours]) for peer in t
                    if not peer.startswith("alt_jax") or (peer == "alt_jax" and ours != peer)}
        plan = impls["alt_jax"].plan_for(*args)
        row["alt_jax_ops_on_kernels"] = [len(plan.rewritten), len(plan.decisions)]
        for name, fn in impls.items():
            if name.startswith("alt_jax") and "tuned" in name:
                tuned = fn.plan_for(*args)
                row["impls"][name]["ops_tuned"] = [
                    sum(d.knobs_from == "tuned" for d in tuned.rewritten), len(tuned.rewritten)]
                if name == "alt_jax tuned":
                    row["per_op"] = per_op_rows(plan, tuned)
        rows.append(row)
        print(f"  measured {model.name}", flush=True)
    return rows


def per_op_rows(untuned, tuned) -> list:
    """Each op of the model: its untuned and tuned family, knobs and (tuned) measured time."""
    out = []
    for u, t in zip(untuned.decisions, tuned.decisions):
        if not (u.on_kernel or t.on_kernel):
            continue
        out.append({"op": f"{t.primitive} {t.signature}", "where": t.where,
                    "untuned": f"{u.family} {u.knobs}" if u.on_kernel else "XLA",
                    "tuned": f"{t.family} {t.knobs}" if t.on_kernel else "XLA",
                    "from": t.knobs_from,
                    "tuned_ms": None if t.tuned_time_s is None else t.tuned_time_s * 1e3})
    return out


def format_per_op(rows) -> str:
    """The per-op table of tuned models (times as the tuner measured them in its worker;
    `alt-tune show RECORDS` adds the untuned times and every run kind)."""
    lines = []
    for r in rows:
        if not r.get("per_op"):
            continue
        lines.append(f"{r['workload']}: ops on tuned knobs "
                     f"{r['impls']['alt_jax tuned']['ops_tuned'][0]}/"
                     f"{r['impls']['alt_jax tuned']['ops_tuned'][1]}")
        for op in r["per_op"]:
            ms = f"{op['tuned_ms']:.3f} ms" if op["tuned_ms"] is not None else "-"
            lines.append(f"  [{op['where']}] {op['op'][:70]:<70} {op['from']:<9} {ms:>10}  "
                         f"{op['tuned'][:90]}")
    return "\n".join(lines)


def format_table(rows) -> str:
    impl_names = list(dict.fromkeys(n for r in rows for n in r["impls"]))
    peer_names = [n for n in impl_names if not n.startswith("alt_jax")]
    head = (f"{'workload':<34} {'x':>3} {'MFLOP':>8} " + " ".join(f"{n + ' ms':>16}" for n in impl_names)
            + f" {'GFLOP/s':>8} {'%peak':>6} " + " ".join(f"{'vs ' + p:>17}" for p in peer_names))
    lines = [head]
    for r in rows:
        ours = r["impls"].get("alt_jax tuned") or r["impls"]["alt_jax"]
        cells = " ".join(f"{r['impls'][n]['median_ms']:16.3f}" if n in r["impls"] else f"{'-':>16}"
                         for n in impl_names)
        ratios = " ".join(f"{ours['speedup_vs'][p]:16.2f}x" if p in ours["speedup_vs"]
                          else f"{'-':>17}" for p in peer_names)
        lines.append(f"{r['workload']:<34} {r['count']:>3} {r['flops'] / 1e6:8.1f} {cells} "
                     f"{ours['gflops']:8.1f} {ours['pct_peak']:6.1f} {ratios}")
    for r in rows:  # which program each peer ran, where it had a choice
        chose = [f"{n} ran {v['program_layout'].upper()} (selection: " +
                 ", ".join(f"{k.upper()} {ms:.3f} ms" for k, ms in v["selection_ms"].items()) + ")"
                 for n, v in r["impls"].items() if "selection_ms" in v]
        if chose:
            lines.append(f"{r['workload']}: {'; '.join(chose)}")
    for r in rows:  # tuning's gain: each tuned column against untuned alt_jax, same rounds
        gains = [f"{n[len('alt_jax '):]} {r['impls'][n]['speedup_vs']['alt_jax']:.3f}x"
                 for n in r["impls"] if n.startswith("alt_jax") and "tuned" in n]
        if gains:
            lines.append(f"{r['workload']}: vs untuned alt_jax: {', '.join(gains)}")
        levels = [f"{label} {r[key]:.3f}x" for key, label in (
            ("graph_vs_fixed_nhwc", "graph-tuned layouts vs fixed NHWC (same records)"),
            ("joint_vs_loop_only", "joint vs loop-only")) if key in r]
        if levels:
            lines.append(f"{r['workload']}: {'; '.join(levels)}")
    for p in peer_names:
        ratios = [(r["impls"].get("alt_jax tuned") or r["impls"]["alt_jax"])["speedup_vs"].get(p)
                  for r in rows]
        ratios = [x for x in ratios if x]
        if ratios:
            lines.append(f"alt_jax vs {p}: geomean {timing.geomean(ratios):.2f}x, "
                         f"worst {min(ratios):.2f}x over {len(ratios)} workloads")
    return "\n".join(lines)


def plot(rows, path: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot written"
    names = [r["workload"] for r in rows]
    peer_names = list(dict.fromkeys(p for r in rows for p in r["impls"]["alt_jax"]["speedup_vs"]))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names) * max(1, len(peer_names))), 4.5))
    width = 0.8 / max(1, len(peer_names))
    for i, peer in enumerate(peer_names):
        values = [r["impls"]["alt_jax"]["speedup_vs"].get(peer, 0) for r in rows]
        ax.bar([j + i * width for j in range(len(names))], values, width, label=f"vs {peer}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(peer_names) - 1) / 2 for j in range(len(names))])
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("alt_jax speedup (median ratio)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return None


def collect_workloads() -> list:
    only = lambda name: not FLAGS.only or any(s in name for s in FLAGS.only)
    workloads = []
    if FLAGS.suite == "models":
        for name in FLAGS.models:
            forms = models.forms(name, FLAGS.batch)  # every program layout: peers may pick
            for layout in FLAGS.layouts:
                if layout not in forms:
                    print(f"skip {name} {layout}: the zoo builds {name} only as "
                          f"{', '.join(forms)}")
                    continue
                if only(forms[layout].name):
                    workloads.append((forms[layout], 1, forms))
    else:
        for suite in FLAGS.ops:
            workloads += [(m, c) for m, c in suites.build_suite(suite) if only(m.name)]
    return workloads


def main(argv):
    del argv
    threads = os.cpu_count() or 1
    peak = _core.fma_peak(threads, 1.0)
    info = machine_info(peak, threads)
    config = timing.MeasureConfig(warmup=2, repeat=FLAGS.repeat, min_round_ms=FLAGS.min_round_ms)
    print(f"{info['cpu']}; fp32 FMA peak {peak:.0f} GFLOP/s on {threads} threads; "
          f"jax {jax.__version__}; medians of {FLAGS.repeat} interleaved rounds; "
          f"speedup = median over rounds of t_peer / t_alt_jax")
    notes: list = []
    settings: dict = {}
    rows = run_workloads(collect_workloads(), config, FLAGS.peers, FLAGS.records, peak,
                         FLAGS.rtol, notes, settings)
    for note in notes:
        print(f"note: {note}")
    print()
    print(format_table(rows))
    per_op = format_per_op(rows)
    if per_op:
        print()
        print(per_op)
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump({"machine": info, "thread_settings": settings, "notes": notes,
                       "protocol": {"warmup": config.warmup, "repeat": config.repeat,
                                    "min_round_ms": config.min_round_ms,
                                    "pause_ms": config.pause_ms},
                       "argv": sys.argv, "rows": rows}, f, indent=1)
        print(f"wrote {FLAGS.json_out}")
    if FLAGS.plot_out:
        problem = plot(rows, FLAGS.plot_out) if rows else "no rows"
        print(f"note: {problem}" if problem else f"wrote {FLAGS.plot_out}")


if __name__ == "__main__":
    app.run(main)
