"""The alt-tune command line: show / plot / merge on a hand-written records file, bad
arguments, and (with the real driver) tune end to end, Ctrl-C and resume."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tuner import cli, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV = "cpu:Test CPU|isa=avx2|cores=2"
OTHER_DEV = "cpu:Other CPU|isa=sse2|cores=8"


def rec(op, t_ms, *, status="ok", heuristic=False, mode="joint", search="model",
        model="netA", mult=1, family="conv2d", knobs=None, device=DEV, ts=None):
    """A schema-2 record as tune() writes it (times in ms; three equal repeats)."""
    rec.clock += 1.0
    return {"schema_version": 2, "family": family, "workload_key": f"wk-{family}-{op}",
            "workload": {"op": op}, "op_key": f"op-{op}",
            "layout": {"input_block": 8} if family == "conv2d" else {},
            "knobs": knobs or {"oc_block": 16, "ow_tile": int(t_ms * 10)},
            "device": device, "times_s": [t_ms * 1e-3] * 3 if status == "ok" else [],
            "status": status, "versions": {}, "timestamp": ts or rec.clock,
            "op": f"conv {op}", "multiplicity": mult, "model": model, "mode": mode,
            "search": search, "heuristic": heuristic, "stage": "explore", "trial": 0,
            "run_id": f"{mode}-{search}", "cut": False}


rec.clock = 1000.0

# Model netA: op a (x3) and op b (x1), tuned in joint and in loop_only mode.
# untuned a = min(2.0, 2.1) = 2.0 ms; joint best 1.0 (2.00x), loop_only best 1.6 (1.25x)
# untuned b = 4.0 ms; joint best 3.2 (1.25x), loop_only best 2.5 (1.60x)
# whole: untuned 3*2.0 + 4.0 = 10.0; joint 3*1.0 + 3.2 = 6.2 (1.61x);
#        loop_only 3*1.6 + 2.5 = 7.3 (1.37x)
def records():
    out = [rec("a", 2.0, heuristic=True, mult=3), rec("b", 4.0, heuristic=True),
           rec("a", 1.5, mult=3), rec("b", 3.2), rec("a", 1.0, mult=3),
           rec("a", 0.0, status="invalid", mult=3, knobs={"oc_block": 64, "ow_tile": 99}),
           rec("a", 1.2, mult=3, family="winograd", knobs={"tile": 2})]
    out += [rec("a", 2.1, heuristic=True, mult=3, mode="loop_only"),
            rec("b", 4.0, heuristic=True, mode="loop_only"),
            rec("a", 1.6, mult=3, mode="loop_only"),
            rec("a", 0.0, status="build_error", mult=3, mode="loop_only",
                knobs={"oc_block": 32, "ow_tile": 5}),
            rec("b", 2.5, mode="loop_only")]
    # Another model (random search), and a record of another device (skipped by default).
    out += [rec("c", 8.0, heuristic=True, model="netB", search="random"),
            rec("c", 5.0, model="netB", search="random"),
            rec("a", 0.1, mult=3, device=OTHER_DEV)]
    return out


@pytest.fixture
def records_file(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records()))
    return str(path)


@pytest.fixture
def isolated_imports(monkeypatch):
    """The CLI imports MODULE from the current directory, which it puts on sys.path: both
    are undone, so that each test's own mynet.py is the one imported."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    sys.modules.pop("mynet", None)
    yield
    sys.modules.pop("mynet", None)


def run_cli(capsys, *args):
    code = cli.main(["alt-tune", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _row(out: str, op_label: str, model: str = "netA") -> list:
    (section,) = [s for s in out.split("== ") if s.startswith(model + " ")]
    lines = [l for l in section.splitlines() if l.rstrip().endswith(op_label)]
    assert len(lines) == 1, (op_label, out)
    return lines[0].split()


def test_show_speedups_per_variant(records_file, capsys):
    code, out, err = run_cli(capsys, "show", records_file, f"--device={DEV}")
    assert code == 0, err
    assert "joint/model ms" in out and "loop_only/model ms" in out
    assert "== netA" in out and "== netB" in out
    # columns: # x untuned | joint ms speedup trials | loop_only ms speedup trials | op
    a = _row(out, "conv a")
    assert a[1:9] == ["3", "2.000", "1.000", "2.00x", "5", "1.600", "1.25x", "3"]
    b = _row(out, "conv b")
    assert b[1:9] == ["1", "4.000", "3.200", "1.25x", "2", "2.500", "1.60x", "2"]
    whole = _row(out, "whole model: sum of time x multiplicity")
    assert whole[1:8] == ["10.000", "6.200", "1.61x", "7", "7.300", "1.37x", "5"]
    c = _row(out, "conv c", "netB")
    assert c[1:6] == ["1", "8.000", "5.000", "1.60x", "2"]
    assert "random/model" not in out and "joint/random ms" in out
    # The chosen knobs of the best record, per variant.
    assert "chosen [joint/model]: conv2d | layout input_block=8 | knobs oc_block=16 ow_tile=10" \
        in out
    # The other device's 0.1 ms record is not in this table.
    assert "0.100" not in out and OTHER_DEV not in out
    # Equal budget (netA only: two run kinds): 5 trials each, the curves' whole model.
    assert ("equal budget: whole model (search trials, best so far) after 5 trials of each "
            "run kind; untuned 10.000 ms") in out
    assert "joint/model      6.200 ms (1.613x); after all 7 trials 6.200 ms (1.613x)" in out
    assert "loop_only/model  7.300 ms (1.370x); after all 5 trials 7.300 ms (1.370x)" in out
    assert out.count("equal budget:") == 1


def test_show_numbers_match_the_records(records_file):
    """The report's numbers, recomputed from the file independently."""
    recs = [json.loads(l) for l in open(records_file)]
    (net_a,) = [r for r in report.load(records_file, DEV) if r.model == "netA"]
    for op in net_a.ops:
        mine = [r for r in recs if r["op_key"] == op.op_key and r["device"] == DEV]
        untuned = min(r["times_s"][1] for r in mine if r["heuristic"])
        for variant in ("joint/model", "loop_only/model"):
            ok = [r["times_s"][1] for r in mine if r["status"] == "ok"
                  and f"{r['mode']}/{r['search']}" == variant]
            assert op.speedup(variant) == pytest.approx(untuned / min(ok))


def test_show_default_device_and_all(records_file, capsys):
    code, out, err = run_cli(capsys, "show", records_file)   # this machine: none of them
    assert code == 1 and "--device=all" in err and DEV in err and OTHER_DEV in err
    code, out, err = run_cli(capsys, "show", records_file, "--device=all")
    assert code == 0 and OTHER_DEV in out and DEV in out
    a_other = [l for l in out.split("== ")
               if OTHER_DEV in l.splitlines()[0]][0]
    assert "0.100" in a_other


def test_plot_writes_png(records_file, tmp_path, capsys):
    out_png = tmp_path / "curves.png"
    code, out, err = run_cli(capsys, "plot", records_file, f"--device={DEV}",
                             f"--out={out_png}")
    assert code == 0, err
    # Two models: one PNG each, named after the model.
    written = sorted(p for p in os.listdir(tmp_path) if p.endswith(".png"))
    assert written == ["curves-netA.png", "curves-netB.png"]
    for name in written:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
        assert f"wrote {tmp_path / name}" in out


def test_model_curve_is_weighted_best_so_far(records_file):
    (net_a,) = [r for r in report.load(records_file, DEV) if r.model == "netA"]
    xs, ys = net_a.model_curve("joint/model")
    # start: untuned 10 ms; then each joint record in time order:
    # a 2.0 (heur), b 4.0 (heur), a 1.5, b 3.2, a 1.0, a invalid, a 1.2 (winograd)
    ms = [round(y * 1e3, 6) for y in ys]
    assert xs == list(range(8))
    assert ms == [10.0, 10.0, 10.0, 8.5, 7.7, 6.2, 6.2, 6.2]


def test_merge_dedups(records_file, tmp_path, capsys):
    recs = [json.loads(l) for l in open(records_file)]
    first, second = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in recs[:10]))
    second.write_text("".join(json.dumps(r) + "\n" for r in recs[5:]))   # 5 shared
    out_path = tmp_path / "merged.jsonl"
    code, out, err = run_cli(capsys, "merge", str(out_path), str(first), str(second))
    assert code == 0, err
    merged = [json.loads(l) for l in open(out_path)]
    assert len(merged) == len(recs) and f"{len(recs)} records" in out
    key = lambda r: json.dumps(r, sort_keys=True)
    assert sorted(map(key, merged)) == sorted(map(key, recs))
    code, out, err = run_cli(capsys, "merge", str(out_path), str(second))  # again: no-op
    assert code == 0 and len(open(out_path).readlines()) == len(recs) and "0 added" in out


@pytest.mark.parametrize("args, message", [
    ([], "name a command"),
    (["frobnicate"], "unknown command 'frobnicate'"),
    (["tune", "--model=resnet51"], "unknown model 'resnet51'"),
    (["tune", "--model=bert_layer", "--layout=nchw"], "--model=bert_layer"),
    (["ops", "--suite=nope"], "unknown op suite 'nope'"),
    (["ops"], "needs --suite"),
    (["tune", "json:nothing_here", "--inputs=2x3"], "no attribute"),
    (["tune", "no_such_module_xyz:f", "--inputs=2x3"], "cannot import 'no_such_module_xyz'"),
    (["tune", "numpy:add"], "needs --inputs"),
    (["tune", "numpy:add", "--inputs=1x2y3"], "'1x2y3' is not a shape"),
    (["tune", "numpy:add", "--inputs=2x3,2x3", "--dtypes=f32,f32,f32"], "--dtypes has 3"),
    (["tune", "numpy:add", "--inputs=2x3", "--dtypes=q7"], "unknown dtype 'q7'"),
    (["tune", "numpy", "--inputs=2x3"], "expected MODULE:FUNCTION"),
    (["tune", "--model=tiny_cnn", "--mode=both"], "--mode=both"),
    (["tune", "--model=tiny_cnn", "--trials=-3"], "trials=-3"),
    (["tune", "--model=tiny_cnn", "--wat=1"], "Unknown command line flag 'wat'"),
    (["show"], "show takes one records file"),
    (["show", "/nonexistent/records.jsonl"], "no records file at"),
    (["show", "x.jsonl", "--trials=5"], "show does not take --trials"),
    (["plot", "x.jsonl"], "plot needs --out"),
    (["merge", "out.jsonl"], "merge needs OUT and at least one IN"),
])
def test_bad_arguments_exit_2_with_message(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, err = run_cli(capsys, *args)
    assert code == 2, (args, out, err)
    assert message in err and "usage:" in err


def test_bad_inputs_for_the_function(capsys, tmp_path, monkeypatch, isolated_imports):
    """Shapes the function cannot take: the trace error, named, exit 2."""
    (tmp_path / "mynet.py").write_text(
        "import jax.numpy as jnp\n"
        "def forward(x, w):\n    return jnp.dot(x, w)\n")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "tune", "mynet:forward", "--inputs=4x5,6x7",
                             f"--records={tmp_path / 'r.jsonl'}")
    assert code == 2 and "tracing mynet:forward on inputs [4x5, 6x7] failed" in err
    assert not (tmp_path / "r.jsonl").exists()


def test_help(capsys):
    code, out, err = run_cli(capsys, "--help")
    assert code == 0 and "usage:" in out and "--time_budget" in out


def test_resume_command_is_the_same_command_line():
    argv = [os.path.join(ROOT, "tuner", "__main__.py"), "tune", "--model=tiny_cnn",
            "--records=/tmp/with space.jsonl"]
    assert cli._resume_command(argv) == (f"{sys.executable} -m tuner tune --model=tiny_cnn "
                                         f"'--records=/tmp/with space.jsonl'")


def test_console_script_entry_is_declared():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["scripts"]["alt-tune"] == "tuner.cli:run"
    assert {"tqdm", "lightgbm"} <= set(project["optional-dependencies"]["tune"])


# ---- tune with a fake driver (the CLI's side only: options, bars, summary, Ctrl-C) --------
class FakeDriver:
    """Stands in for tuner.tune.tune: each workload gets a heuristic trial at 2 ms and one
    at 1 ms (a 2x speedup), each also appended to the store, then a confirmation at 2 ms
    and 1.25 ms (1.6x: what the summary reports); optionally raises
    KeyboardInterrupt after `interrupt_after` records, as the real driver does on Ctrl-C."""

    def __init__(self, interrupt_after=None):
        self.interrupt_after = interrupt_after
        self.calls = []

    def __call__(self, workloads, store, options, *, listener=None, **kw):
        from tuner.scheduler import TaskState, Trial
        from tuner.tune import TuneSummary

        self.calls.append((workloads, options))
        tasks = [TaskState(w) for w in workloads]
        listener.on_start(tasks, options)
        written = 0
        for task in tasks:
            for i, (t, heur) in enumerate(((2e-3, True), (1e-3, False))):
                if self.interrupt_after is not None and written >= self.interrupt_after:
                    raise KeyboardInterrupt
                r = rec(task.workload.op_key, t * 1e3, heuristic=heur, model=options.model)
                r["op_key"] = task.workload.op_key
                store.append(r)
                written += 1
                trial = Trial("conv2d", None, {}, "ok", t, heur, "explore", i)
                task.add(trial)
                listener.on_trial(task, trial)
        for task in tasks:  # the confirmation pass re-times the 1 ms one at 1.25 ms
            task.confirmed = (2e-3, 1.25e-3)
            listener.on_confirm(task)
        summary = TuneSummary(tasks, 0.5, False, store.path)
        listener.on_finish(summary)
        return summary


def test_tune_with_fake_driver_bars_and_summary(capsys, tmp_path, monkeypatch):
    import tuner.tune

    fake = FakeDriver()
    monkeypatch.setattr(tuner.tune, "tune", fake)
    monkeypatch.chdir(ROOT)
    path = tmp_path / "r.jsonl"
    code, out, err = run_cli(capsys, "tune", "--model=tiny_cnn", "--trials=40", "--batch=4",
                             "--mode=loop_only", "--search=random", "--seed=3", "--progress",
                             f"--records={path}")
    assert code == 0, err
    (workloads, options), = fake.calls
    assert (options.trials, options.batch, options.mode, options.search, options.seed,
            options.model) == (40, 4, "loop_only", "random", 3, "tiny_cnn-nhwc")
    assert len(workloads) >= 2 and all(w.multiplicity >= 1 for w in workloads)
    # tqdm drew on stderr: the overall bar's count and whole-model speedup.
    n = 2 * len(workloads)
    assert f"{n}/40" in err and "whole model 2.00x vs untuned" in err
    assert "best 1.000 ms" in err
    assert f"confirmed op {len(workloads)}/{len(workloads)}" in err
    assert "whole model 1.60x vs untuned" in err
    # The summary: the confirmed times, each op 1.60x, whole model 1.60x.
    assert out.count("1.60x") == len(workloads) + 1 and "2.00x" not in out
    assert len(open(path).readlines()) == n


def test_tune_without_progress_draws_no_bars(capsys, tmp_path, monkeypatch):
    import tuner.tune

    monkeypatch.setattr(tuner.tune, "tune", FakeDriver())
    monkeypatch.chdir(ROOT)
    code, out, err = run_cli(capsys, "tune", "--model=tiny_cnn", "--noprogress",
                             f"--records={tmp_path / 'r.jsonl'}")
    assert code == 0 and "trial/s" not in err and "it/s" not in err and "/1000" not in err


def test_ctrl_c_with_fake_driver_exits_130_with_resume_hint(capsys, tmp_path, monkeypatch):
    import tuner.tune

    monkeypatch.setattr(tuner.tune, "tune", FakeDriver(interrupt_after=3))
    monkeypatch.chdir(ROOT)
    path = tmp_path / "r.jsonl"
    argv = ["tune", "--model=tiny_cnn", "--trials=16", "--progress", f"--records={path}"]
    code = cli.main([os.path.join(ROOT, "tuner", "__main__.py"), *argv])
    out, err = capsys.readouterr()
    assert code == 130
    assert f"interrupted: 3 records in {path} (3 written by this run" in err
    assert f"{sys.executable} -m tuner tune --model=tiny_cnn --trials=16 --progress " \
           f"--records={path}" in err


# ---- the real driver, in a subprocess as a user runs it -----------------------------------
TUNE_ARGS = ["tune", "--model=tiny_cnn", "--trials=16"]


@pytest.fixture(scope="module")
def tune_env(tmp_path_factory):
    """A private kernel cache shared by the two runs below (the second builds less)."""
    env = dict(os.environ)
    env["ALT_JAX_CACHE_DIR"] = str(tmp_path_factory.mktemp("kernels"))
    env.pop("ALT_JAX_RECORDS", None)
    return env


def _records_lines(path) -> list:
    from alt_jax.records import check_record

    lines = open(path).read().splitlines()
    for line in lines:   # every line a complete, well-formed record
        assert check_record(json.loads(line)) is None, line
    return lines


def test_tune_show_plot_end_to_end(tune_env, tmp_path, capsys, monkeypatch):
    path = tmp_path / "r.jsonl"
    done = subprocess.run([sys.executable, "-m", "tuner", *TUNE_ARGS, f"--records={path}"],
                          cwd=ROOT, env=tune_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = _records_lines(path)
    recs = [json.loads(l) for l in lines]
    trials = [r for r in recs if r.get("stage") != "confirm"]
    assert 2 <= len(trials) <= 16
    assert {r["model"] for r in recs} == {"tiny_cnn-nhwc"}
    assert sum(r["heuristic"] for r in trials) == len({r["op_key"] for r in recs})
    # The summary's whole-model row counts every trial (a confirmation pass re-times).
    whole = [l for l in done.stdout.splitlines() if l.startswith("all ")]
    assert len(whole) == 1 and whole[0].split()[1] == str(len(trials)), done.stdout

    monkeypatch.setenv("ALT_JAX_CACHE_DIR", tune_env["ALT_JAX_CACHE_DIR"])
    code, out, err = run_cli(capsys, "show", str(path))   # this machine's records
    assert code == 0, err
    (net,) = report.load(str(path), None)
    assert len(net.ops) == len({r["op_key"] for r in recs})
    for op in net.ops:
        assert op.label in out
        assert f"{op.speedup('joint/model'):.2f}x" in _row(out, op.label, "tiny_cnn-nhwc")
    untuned, tuned, _ = net.whole("joint/model")
    assert f"{untuned / tuned:.2f}x" in _row(out, "sum of time x multiplicity", "tiny_cnn-nhwc")
    # The records are the ones benchmarks.run's "alt_jax tuned" looks up: its binding
    # (optimize(jit(apply)).prepare(params): weights as constants) finds every op tuned,
    # at the best time of the records.
    import jax

    import alt_jax
    from alt_jax import runtime
    from benchmarks import models

    model = models.build("tiny_cnn")
    plan = alt_jax.optimize(jax.jit(model.apply), fallback="silent", records=str(path),
                            cache=runtime.KernelCache(tune_env["ALT_JAX_CACHE_DIR"])
                            ).prepare(model.params).plan_for(*model.inputs)
    tuned = sorted(d.tuned_time_s for d in plan.decisions if d.knobs_from == "tuned")
    assert tuned == pytest.approx(sorted(op.variants["joint/model"].best_s for op in net.ops))

    png = tmp_path / "curves.png"
    code, out, err = run_cli(capsys, "plot", str(path), f"--out={png}")
    assert code == 0, err
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 5000


def test_ctrl_c_then_resume(tune_env, tmp_path, sigint_raises):
    path = tmp_path / "r.jsonl"
    argv = [sys.executable, "-m", "tuner", *TUNE_ARGS, f"--records={path}"]
    proc = subprocess.Popen(argv, cwd=ROOT, env=tune_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists() and len(path.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    first = _records_lines(path)
    assert len(first) >= 3
    assert f"interrupted: {len(first)} records in {path}" in err
    assert "Resume with the same command:\n  " + " ".join(argv) in err
    assert "Traceback" not in err

    done = subprocess.run(argv, cwd=ROOT, env=tune_env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"({len(first)} already there)" in done.stdout
    second = _records_lines(path)
    assert second[:len(first)] == first           # nothing earlier lost or rewritten
    trials = [r for r in map(json.loads, second) if r.get("stage") != "confirm"]
    assert len(first) < len(second) and len(trials) <= 16  # the budget counts resumed trials
    keys = [(r["family"], r["workload_key"], json.dumps(r["knobs"], sort_keys=True))
            for r in trials]
    assert len(keys) == len(set(keys)), "a candidate was measured twice"


def test_tune_a_decorated_function_with_fake_driver(capsys, tmp_path, monkeypatch,
                                                    isolated_imports):
    """MODULE:FUNCTION with --inputs/--dtypes: an @alt_jax.optimize function is tuned as
    its undecorated fn, on arrays of the given shapes; the records say 'mynet:forward'."""
    import tuner.tune

    fake = FakeDriver()
    monkeypatch.setattr(tuner.tune, "tune", fake)
    (tmp_path / "mynet.py").write_text(
        "import alt_jax, jax.numpy as jnp\n"
        "@alt_jax.optimize\n"
        "def forward(x, w, n):\n"
        "    assert x.dtype == jnp.float32 and n.dtype == jnp.int32\n"
        "    return jnp.maximum(x @ w, 0.0) + n\n")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "tune", "mynet:forward",
                             "--inputs=128x256,256x512,1", "--dtypes=f32,f32,i32",
                             f"--records={tmp_path / 'r.jsonl'}")
    assert code == 0, err
    (workloads, options), = fake.calls
    assert options.model == "mynet:forward"
    (w,) = workloads
    assert w.label.startswith("dot_general f32[128,256], f32[256,512] -> f32[128,512]")
    # A path to the file works too.
    code, out, err = run_cli(capsys, "tune", f"{tmp_path / 'mynet.py'}:forward",
                             "--inputs=128x256,256x512,1", "--dtypes=f32,f32,i32",
                             f"--records={tmp_path / 'r.jsonl'}")
    assert code == 0, err
