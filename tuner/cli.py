"""The `alt-tune` command line (also `python -m tuner`): tune a program's ops, report on records.

Entry points: run() (the console script), main(argv) -> exit status, USAGE.
  alt-tune tune MODULE:FUNCTION --inputs=1x224x224x3[,...] [--dtypes=f32[,...]]
  alt-tune tune --model=resnet50 [--layout=nhwc] [--model_batch=1]
  alt-tune ops --suite=resnet50_convs
  alt-tune show RECORDS [--device=all|FINGERPRINT]
  alt-tune plot RECORDS --out=curves.png [--device=...]
  alt-tune merge OUT IN [IN...]
Exit status: 0 done, 1 nothing to report, 2 a bad argument (the message names it),
130 interrupted (Ctrl-C: the records written so far are kept; the same command resumes).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import os
import shlex
import shutil
import sys
from typing import Optional

from absl import flags

USAGE = """usage:
  alt-tune tune MODULE:FUNCTION --inputs=1x224x224x3[,...] [--dtypes=f32[,...]] [options]
  alt-tune tune --model=NAME [--layout=nhwc|nchw] [--model_batch=1] [options]
  alt-tune ops --suite=NAME [options]
  alt-tune tune ... --cluster=ray|ray://HOST:PORT|HOST:PORT [--devices=avx512,FINGERPRINT,...]
      (each device kind tuned on the Ray nodes that carry it; records come back here)
  alt-tune tune ... --gpu   (the CUDA kernels, on this machine's GPU)
  alt-tune node [--devices=...]   (the `ray start --resources` a node measuring for these
      device kinds, default this machine's, joins the cluster with)
  alt-tune layouts --model=NAME [--layout=nhwc|nchw] --records=R   (the graph level: each
      conv's output layout over the whole program; after `tune --layouts=NC8,NC16`, whose
      records give it tuned kernels under each layout)
  alt-tune show RECORDS [--device=all|FINGERPRINT]
  alt-tune plot RECORDS --out=F.png [--device=all|FINGERPRINT]
  alt-tune merge OUT IN [IN...]
tuning options: --records --trials --time_budget --batch --mode --search --seed --[no]progress
A run resumes from its records file: candidates this device already measured in the same
--mode and --search are not measured again, and count toward --trials (to start afresh,
give a new --records file).
`alt-tune --help` lists every flag."""

TUNING_FLAGS = ("records", "trials", "time_budget", "batch", "mode", "search", "seed",
                "progress")
# Which flags each command accepts: a flag given to a command that ignores it is an error
# (`alt-tune show --trials=5` is a mistake worth saying so).
COMMAND_FLAGS = {
    "tune": TUNING_FLAGS + ("inputs", "dtypes", "model", "layout", "model_batch", "layouts",
                            "cluster", "devices", "gpu"),
    "node": ("devices",),
    "ops": TUNING_FLAGS + ("suite",),
    "show": ("device",),
    "plot": ("device", "out"),
    "merge": (),
    "layouts": ("records", "model", "layout", "model_batch"),
}
DEFAULT_RECORDS = "alt_jax_records.jsonl"
DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "f64": "float64",
          "i8": "int8", "i16": "int16", "i32": "int32", "i64": "int64", "u8": "uint8",
          "bool": "bool"}


class UsageError(Exception):
    """A bad command line: printed with a pointer to the usage, exit status 2."""


def _define(fv: flags.FlagValues) -> None:
    """The flags, in a FlagValues of their own: benchmarks.run defines --batch and --records
    in absl's global FLAGS, and both modules may be imported by one process (pytest)."""
    kw = dict(flag_values=fv)
    flags.DEFINE_string("records", None, "tuning records file (JSON lines), appended to; "
                        f"default $ALT_JAX_RECORDS, else ./{DEFAULT_RECORDS}", **kw)
    flags.DEFINE_integer("trials", None, "measured candidates in all, over every op, resumed "
                         "ones included (default: tuner.tune.TuneOptions.trials)", **kw)
    flags.DEFINE_float("time_budget", None, "stop after this many seconds of this run "
                       "(default: no limit)", **kw)
    flags.DEFINE_integer("batch", None, "candidates compiled together before they are "
                         "measured one by one (default: TuneOptions.batch)", **kw)
    flags.DEFINE_enum("mode", None, ["joint", "loop_only"], "joint: layouts and loops "
                      "together; loop_only: layouts fixed at the heuristic's (the ablation). "
                      "Default joint", **kw)
    flags.DEFINE_enum("search", None, ["model", "random"], "model: cost-model guided; "
                      "random: the baseline. Default model", **kw)
    flags.DEFINE_integer("seed", None, "search seed (default 0)", **kw)
    flags.DEFINE_integer("confirm", None, "after the search, re-time each op's heuristic and "
                         "this many best candidates together; optimize() uses that pass's "
                         "choice (default: TuneOptions.confirm; 0: no pass)", **kw)
    flags.DEFINE_integer("confirm_rounds", None, "interleaved rounds of the confirmation "
                         "pass (default: TuneOptions.confirm_rounds)", **kw)
    flags.DEFINE_float("confirm_margin", None, "the confirmation pass keeps the heuristic "
                       "unless a candidate is this much faster (default: "
                       "TuneOptions.confirm_margin, 0.03)", **kw)
    flags.DEFINE_bool("progress", None, "progress bars (default: when stderr is a terminal)",
                      **kw)
    flags.DEFINE_list("inputs", [], "tune MODULE:FUNCTION: the shapes of FUNCTION's "
                      "arguments, e.g. 1x224x224x3,1000x10 (called with seeded normal floats "
                      "/ integer zeros of these shapes)", **kw)
    flags.DEFINE_list("dtypes", ["f32"], "dtype of each --inputs array, or one for all: "
                      + ", ".join(DTYPES), **kw)
    flags.DEFINE_string("model", None, "tune a model of benchmarks/models (run from the "
                        "alt_jax checkout), with its weights as constants exactly as "
                        "benchmarks.run binds them (prepare: weights packed once)", **kw)
    flags.DEFINE_enum("layout", "nhwc", ["nhwc", "nchw"], "--model's program layout", **kw)
    flags.DEFINE_list("layouts", [], "tune --model: also tune its ops with every conv writing "
                      "each of these layouts (NHWC, NC8, NC16, logical), for `layouts`", **kw)
    flags.DEFINE_integer("model_batch", 1, "--model's batch size", lower_bound=1, **kw)
    flags.DEFINE_string("suite", None, "op suite of benchmarks/suites.py for `ops`", **kw)
    flags.DEFINE_string("cluster", None, "tune on a Ray cluster: 'ray' (RAY_ADDRESS, a "
                        "running local cluster, or a new one), 'ray://HOST:PORT' or "
                        "'HOST:PORT' (tuner/cluster.py)", **kw)
    flags.DEFINE_bool("gpu", False, "tune: the program's CUDA kernels on this machine's GPU "
                      "(nvcc builds, CUDA-event timings; records keyed by the GPU)", **kw)
    flags.DEFINE_list("devices", [], "--cluster / node: the device kinds to tune for, each an "
                      "ISA name (this machine's CPU generating it) or a full fingerprint "
                      "'cpu:MODEL|isa=NAME|cores=N' (default: this machine's)", **kw)
    flags.DEFINE_string("device", None, "show / plot: records of this device fingerprint; "
                        "'all' for every device (default: this machine's)", **kw)
    flags.DEFINE_string("out", None, "plot: the PNG to write (one per model, suffixed with "
                        "the model's name, when the records hold several)", **kw)


def _records_path(fv) -> str:
    from alt_jax import config

    return os.path.abspath(fv.records or config.get("records") or DEFAULT_RECORDS)


# ---- what to tune -------------------------------------------------------------------------
def parse_shape(text: str) -> tuple:
    parts = text.strip().lower().split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if not dims or any(d < 0 for d in dims):
        raise UsageError(f"--inputs: {text!r} is not a shape; write dimensions joined by "
                         f"'x', e.g. 1x224x224x3")
    return dims


def parse_dtypes(names: list, n: int) -> list:
    import jax.numpy as jnp

    if len(names) not in (1, n):
        raise UsageError(f"--dtypes has {len(names)} entries for {n} --inputs: give one for "
                         f"all or one per input")
    out = []
    for name in names:
        try:
            out.append(jnp.dtype(DTYPES.get(name, name)))
        except TypeError:
            raise UsageError(f"--dtypes: unknown dtype {name!r}; use one of "
                             f"{', '.join(DTYPES)}") from None
    return out * n if len(out) == 1 else out


def example_inputs(shapes: list, dtypes: list) -> list:
    """Seeded normal floats, zeros for other dtypes (only the shapes matter to tracing)."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for shape, dtype in zip(shapes, dtypes):
        if jnp.issubdtype(dtype, jnp.floating):
            out.append(jnp.asarray(rng.standard_normal(shape), dtype=dtype))
        else:
            out.append(jnp.zeros(shape, dtype))
    return out


def load_function(target: str):
    """MODULE:FUNCTION (MODULE a dotted name importable from the current directory, or a
    path to a .py file); an alt_jax.optimize-decorated function gives its undecorated fn."""
    import alt_jax

    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{target!r}: expected MODULE:FUNCTION, e.g. mynet:forward or "
                         f"path/to/mynet.py:forward")
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            if not os.path.isfile(module_name):
                raise UsageError(f"{target!r}: no file {module_name!r}")
            spec = importlib.util.spec_from_file_location(
                os.path.splitext(os.path.basename(module_name))[0], module_name)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            # The current directory, as `python -m tuner` has it (a console script does not).
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except UsageError:
        raise
    except ModuleNotFoundError as e:
        raise UsageError(f"{target!r}: cannot import {module_name!r} ({e}); run from the "
                         f"directory that holds it or give a path to the .py file") from None
    except Exception as e:  # noqa: BLE001 - the user's module failed while importing
        raise UsageError(f"{target!r}: importing {module_name!r} failed: "
                         f"{type(e).__name__}: {e}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{target!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, alt_jax.Optimized):
        obj = obj.fn
    if not callable(obj):
        raise UsageError(f"{target!r} is a {type(obj).__name__}, not a function")
    return obj


def _benchmarks():
    """benchmarks.models and benchmarks.suites (they live in the checkout, not the wheel)."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        from benchmarks import models, suites
    except ImportError as e:
        raise UsageError(f"--model and `ops` use the benchmarks package of the alt_jax "
                         f"checkout ({e}); run alt-tune from the checkout's root") from None
    return models, suites


def _zoo_model(fv):
    """The benchmarks model --model / --layout / --model_batch name."""
    models, _ = _benchmarks()
    try:
        return models.build(fv.model, layout=fv.layout, batch=fv.model_batch)
    except ValueError as e:
        raise UsageError(f"--model={fv.model}: {e}") from None


def bound_workloads(model, layouts=(), platform=None) -> list:
    """A zoo/suite Model's workloads as benchmarks.run's alt_jax runs it: optimize(jit(apply))
    .prepare(params), i.e. the params closed over as constants (weights packed once), so
    the records' specs are the ones that run's optimize() looks up. layouts: also the
    workloads with every conv writing each of these layouts (propagate.LAYOUT_CHOICES), so
    that the graph tuner (`layouts`) finds tuned kernels for them."""
    import jax

    from alt_jax import planner
    from tuner.tune import workloads_of

    fn = functools.partial(jax.jit(model.apply), model.params)
    found = workloads_of(fn, *model.inputs, platform=platform)
    for choice in layouts:
        found += workloads_of(fn, *model.inputs, layout_plan=choice, platform=platform)
    return planner.merge_workloads(found)


def workloads_for(fv, args: list, platform=None) -> tuple:
    """(label written into the records, [Workload]) for `tune` (platform="cuda": the
    workloads of the GPU plan)."""
    if fv.model and args:
        raise UsageError("give either MODULE:FUNCTION or --model, not both")
    if fv.layouts:
        from alt_jax.propagate import LAYOUT_CHOICES

        bad = [name for name in fv.layouts if name not in LAYOUT_CHOICES]
        if bad or not fv.model:
            raise UsageError(f"--layouts={','.join(fv.layouts)}: needs --model and names from "
                             f"{', '.join(LAYOUT_CHOICES)}")
    if fv.model:
        if fv.inputs:
            raise UsageError("--inputs is for MODULE:FUNCTION; a --model has its own inputs")
        model = _zoo_model(fv)
        label = model.name + (f"-b{fv.model_batch}" if fv.model_batch != 1 else "")
        return label, bound_workloads(model, fv.layouts, platform)
    if len(args) != 1:
        raise UsageError("tune needs one MODULE:FUNCTION (or --model=NAME)"
                         + (f"; got {args}" if args else ""))
    if not fv.inputs:
        raise UsageError("tune MODULE:FUNCTION needs --inputs=SHAPE[,SHAPE...], e.g. "
                         "--inputs=1x224x224x3")
    fn = load_function(args[0])
    shapes = [parse_shape(s) for s in fv.inputs]
    inputs = example_inputs(shapes, parse_dtypes(fv.dtypes, len(shapes)))
    from tuner.tune import workloads_of

    try:
        return args[0], workloads_of(fn, *inputs, platform=platform)
    except Exception as e:  # noqa: BLE001 - most likely inputs that do not fit the function
        shown = ", ".join("x".join(map(str, s)) for s in shapes)
        raise UsageError(f"tracing {args[0]} on inputs [{shown}] failed: "
                         f"{type(e).__name__}: {e}") from None


def suite_workloads(name: str) -> list:
    """Each op of the suite, its workloads weighted by the op's multiplicity."""
    _, suites = _benchmarks()
    try:
        ops = suites.build_suite(name)
    except ValueError as e:
        raise UsageError(f"--suite={name}: {e}") from None
    out = []
    for model, count in ops:
        out += [dataclasses.replace(w, multiplicity=w.multiplicity * count)
                for w in bound_workloads(model)]
    return out


# ---- commands -----------------------------------------------------------------------------
def _resume_command(argv: list) -> str:
    prog = argv[0]
    if os.path.basename(prog) == "__main__.py":
        head = [sys.executable, "-m", "tuner"]
    else:
        found = shutil.which(os.path.basename(prog))
        same = found and os.path.realpath(found) == os.path.realpath(prog)
        head = [os.path.basename(prog) if same else prog]
    return shlex.join(head + list(argv[1:]))


def _count_records(path: str) -> int:
    from alt_jax.records import RecordStore

    return len(RecordStore(path).records())


def _interrupted(path: str, before: int, argv: list) -> int:
    n = _count_records(path)
    print(f"\ninterrupted: {n} records in {path} ({n - before} written by this run; each "
          f"is complete). Resume with the same command:\n  {_resume_command(argv)}",
          file=sys.stderr, flush=True)
    return 130


def format_summary(summary) -> str:
    from tuner.report import columns, format_ms as ms

    rows = [["#", "x", "trials", "untuned ms", "best ms", "speedup", "op"]]
    for i, t in enumerate(summary.tasks, 1):
        untuned, best = t.result
        s = untuned / best if untuned and best else None
        rows.append([str(i), str(t.workload.multiplicity), str(t.trials), ms(untuned),
                     ms(best), "-" if s is None else f"{s:.2f}x", t.workload.label])
    both = [t for t in summary.tasks if all(t.result)]
    total = lambda i: ms(sum(t.result[i] * t.workload.multiplicity for t in both)
                         if both else None)
    s = summary.speedup
    rows.append(["all", "", str(sum(t.trials for t in summary.tasks)), total(0),
                 total(1), "-" if s is None else f"{s:.2f}x",
                 "whole model: sum of time x multiplicity"
                 + (f" ({len(both)} of {len(summary.tasks)} ops)"
                    if len(both) < len(summary.tasks) else "")])
    return "\n".join(columns(rows, right=set(range(6))))


def tune_options(fv):
    """TuneOptions from the flags given (the driver's defaults for the others); checked
    before anything is traced."""
    from tuner.tune import TuneOptions

    given = {"trials": fv.trials, "time_budget_s": fv.time_budget, "batch": fv.batch,
             "mode": fv.mode, "search": fv.search, "seed": fv.seed, "confirm": fv.confirm,
             "confirm_rounds": fv.confirm_rounds, "confirm_margin": fv.confirm_margin}
    try:
        return TuneOptions(**{k: v for k, v in given.items() if v is not None})
    except ValueError as e:
        raise UsageError(str(e)) from None


def _run_start(fv, options, label: str, workloads: list) -> tuple:
    """(options labelled, records path, records already there) for a tuning run; a
    UsageError when nothing of the program would run on a kernel."""
    if not workloads:
        raise UsageError(f"{label}: no conv or matmul of it would run on a kernel (ops below "
                         f"min_flops, $ALT_JAX_MIN_FLOPS, stay in XLA): nothing to tune")
    path = _records_path(fv)
    return dataclasses.replace(options, model=label), path, _count_records(path)


def _tune(fv, options, label: str, workloads: list, argv: list, **tune_kwargs) -> int:
    from alt_jax import device
    from alt_jax.records import RecordStore
    from tuner.progress import ProgressBars, bars_wanted
    from tuner.tune import tune

    options, path, before = _run_start(fv, options, label, workloads)
    store = RecordStore(path)
    mults = sum(w.multiplicity for w in workloads)
    budget = f"{options.trials} trials" + (f" or {options.time_budget_s:g} s"
                                           if options.time_budget_s is not None else "")
    ops = len({w.op_key for w in workloads})
    kind = tune_kwargs.get("device_kind")
    where = kind.fingerprint if kind is not None else device.fingerprint()
    print(f"alt-tune: {label}: {ops} ops ({mults} with repeats), {options.mode}/"
          f"{options.search}, {budget}, on {where}\n"
          f"records: {path} ({before} already there)", flush=True)
    bars = ProgressBars(bars_wanted(fv.progress))
    try:
        summary = tune(workloads, store, options, listener=bars, **tune_kwargs)
    except KeyboardInterrupt:
        bars.close()
        return _interrupted(path, before, argv)
    finally:
        bars.close()
    print(format_summary(summary))
    print(f"{summary.wall_s:.0f} s; {_count_records(path) - before} new records in {path}; "
          f"more: alt-tune show {shlex.quote(path)}")
    return 130 if summary.interrupted else 0


def cmd_tune(fv, args: list, argv: list) -> int:
    options = tune_options(fv)
    if fv.devices and not fv.cluster:
        raise UsageError("--devices names the device kinds of a --cluster run")
    kinds = device_kinds(fv.devices) if fv.cluster else None
    if fv.gpu:
        if fv.cluster:
            raise UsageError("--gpu tunes this machine's GPU; a --cluster run names its "
                             "kinds with --devices")
        return _tune_gpu(fv, options, args, argv)
    label, workloads = workloads_for(fv, args)
    if fv.cluster:
        return _tune_cluster(fv, options, label, workloads, workload_source(fv, args), kinds,
                             argv)
    return _tune(fv, options, label, workloads, argv)


def _tune_gpu(fv, options, args: list, argv: list) -> int:
    """Tunes the program's CUDA workloads on this machine's GPU (tuner/measure_cuda.py:
    nvcc builds, a check against lax, CUDA-event timings); records keyed by the GPU."""
    from tuner import measure_cuda

    kind = measure_cuda.local_gpu_kind()
    if kind is None:
        raise UsageError("--gpu: no GPU visible to jax here (install a CUDA jax, or tune "
                         "the CPU without --gpu)")
    label, workloads = workloads_for(fv, args, platform="cuda")
    measurer = measure_cuda.CudaMeasurer(kind.target, measure_cuda.GpuRunner(kind.target),
                                         options.measure, options.seed)
    return _tune(fv, options, label, workloads, argv, measurer=measurer, device_kind=kind)


def device_kinds(names: list) -> list:
    """--devices as tuner.cluster.DeviceKind (default: this machine's)."""
    from alt_jax import device
    from tuner.cluster import DeviceKind

    try:
        return [DeviceKind.parse(n) for n in (names or [device.detect_isa().name])]
    except ValueError as e:
        raise UsageError(f"--devices: {e}") from None


def workload_source(fv, args: list):
    """How a cluster node rebuilds the workloads workloads_for traced here."""
    from tuner.cluster import WorkloadSource

    if fv.model:
        return WorkloadSource(model=fv.model, layout=fv.layout, batch=fv.model_batch,
                              layouts=tuple(fv.layouts))
    shapes = tuple(parse_shape(s) for s in fv.inputs)
    return WorkloadSource(function=args[0], shapes=shapes,
                          dtypes=tuple(parse_dtypes(fv.dtypes, len(shapes))))


def _tune_cluster(fv, options, label: str, workloads: list, source, kinds: list,
                  argv: list) -> int:
    import statistics

    from alt_jax.records import RecordStore
    from tuner import cluster

    options, path, before = _run_start(fv, options, label, workloads)
    print(f"alt-tune: {label}: {len({w.op_key for w in workloads})} ops, {options.mode}/"
          f"{options.search}, {options.trials} trials per device kind, on the Ray cluster "
          f"{fv.cluster} for:\n" + "\n".join(f"  {k.fingerprint}  (resource {k.resource})"
                                             for k in kinds)
          + f"\nrecords: {path} ({before} already there)", flush=True)
    try:
        outcome = cluster.tune_on_cluster(workloads, source, kinds, RecordStore(path), options,
                                          address=fv.cluster)
    except cluster.ClusterError as e:
        print(f"alt-tune: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return _interrupted(path, before, argv)
    for kind in kinds:
        summary, measurer = outcome[kind]
        runs = measurer.placements
        print(f"\n== {kind.fingerprint}: {len(runs)} batches on "
              f"{len({b.node for b in runs})} node(s)")
        print(format_summary(summary))
        if runs:
            print("Ray's share per batch (submit to result, less the node's own time): median "
                  f"{1e3 * statistics.median(b.wall_s - b.node_s for b in runs):.1f} ms; "
                  f"the node's own: median {statistics.median(b.node_s for b in runs):.2f} s")
    print(f"{_count_records(path) - before} new records in {path}")
    return 0


def cmd_node(fv, args: list, argv: list) -> int:
    import json

    from tuner.cluster import node_resources

    if args:
        raise UsageError(f"node takes no arguments; got {args}")
    kinds = device_kinds(fv.devices)
    for k in kinds:
        print(f"# {k.fingerprint}")
    print(f"ray start --address=HEAD:6379 --resources='{json.dumps(node_resources(kinds))}'")
    return 0


def cmd_ops(fv, args: list, argv: list) -> int:
    if args:
        raise UsageError(f"ops takes no positional arguments (got {args}); name the suite "
                         f"with --suite")
    if not fv.suite:
        _, suites = _benchmarks()
        raise UsageError(f"ops needs --suite=NAME, one of {sorted(suites.SUITES)}")
    options = tune_options(fv)
    return _tune(fv, options, fv.suite, suite_workloads(fv.suite), argv)


def _reports(fv, args: list, command: str) -> Optional[list]:
    from alt_jax import device
    from tuner import report

    if len(args) != 1:
        raise UsageError(f"{command} takes one records file" + (f"; got {args}" if args else ""))
    path = args[0]
    if not os.path.isfile(path):
        raise UsageError(f"{command}: no records file at {path!r}")
    wanted = None if fv.device == "all" else (fv.device or device.fingerprint())
    reports = report.load(path, wanted)
    if not reports:
        present = report.devices_in(path)
        if not present:
            print(f"{path}: no records", file=sys.stderr)
        else:
            listing = "\n".join(f"  {n:6d}  {d}" for d, n in sorted(present.items()))
            print(f"{path}: no records of device {wanted!r}; --device=all shows every "
                  f"device, or name one:\n{listing}", file=sys.stderr)
        return None
    return reports


def cmd_show(fv, args: list, argv: list) -> int:
    from tuner import report

    reports = _reports(fv, args, "show")
    if reports is None:
        return 1
    print("untuned: the heuristic's knobs; <mode>/<search> ms: what optimize() uses from that "
          "mode and search\n(the choice of its confirmation pass, else its fastest ok record); "
          "speedup = untuned / tuned,\nboth from the same confirmation pass where there is "
          "one (the untuned column is the\nheuristic's fastest time in any trial, so a column's "
          "ratio may differ from its speedup)\n")
    print(report.format_report(reports), end="")
    return 0


def cmd_plot(fv, args: list, argv: list) -> int:
    from tuner import report

    if not fv.out:
        raise UsageError("plot needs --out=F.png")
    reports = _reports(fv, args, "plot")
    if reports is None:
        return 1
    try:
        paths = report.plot(reports, fv.out)
    except report.PlotUnavailable as e:
        raise UsageError(str(e)) from None
    for p in paths:
        print(f"wrote {p}")
    return 0


def cmd_merge(fv, args: list, argv: list) -> int:
    from alt_jax.records import merge_files

    if len(args) < 2:
        raise UsageError("merge needs OUT and at least one IN records file")
    out, inputs = args[0], args[1:]
    missing = [p for p in inputs if not os.path.isfile(p)]
    if missing:
        raise UsageError(f"merge: no records file at {', '.join(map(repr, missing))}")
    before = _count_records(out) if os.path.isfile(out) else 0
    n = merge_files(out, inputs)
    print(f"{out}: {n} records ({n - before} added from {len(inputs)} file(s))")
    return 0


def cmd_layouts(fv, args: list, argv: list) -> int:
    if args or not fv.model:
        raise UsageError("layouts needs --model=NAME and no positional arguments")
    import functools

    import jax

    from tuner import graph_tuner

    model = _zoo_model(fv)
    path = fv.records or DEFAULT_RECORDS
    result = graph_tuner.tune_layouts(functools.partial(jax.jit(model.apply), model.params),
                                      *model.inputs, records=path)
    print(graph_tuner.format_result(result))
    return 0


COMMANDS = {"tune": cmd_tune, "ops": cmd_ops, "show": cmd_show, "plot": cmd_plot,
            "merge": cmd_merge, "layouts": cmd_layouts, "node": cmd_node}


def main(argv: list) -> int:
    """Runs the command line argv (program name first); returns the exit status."""
    fv = flags.FlagValues()
    _define(fv)
    if any(a in ("-h", "--help", "-help", "--helpfull", "help") for a in argv[1:]):
        print(USAGE + "\n\nflags:\n" + fv.get_help(include_special_flags=False))
        return 0
    try:
        args = fv(list(argv))[1:]
    except flags.Error as e:
        return _usage_error(str(e))
    try:
        if not args:
            raise UsageError(f"name a command: {', '.join(COMMANDS)}")
        command, rest = args[0], args[1:]
        if command not in COMMANDS:
            raise UsageError(f"unknown command {command!r}; choose one of "
                             f"{', '.join(COMMANDS)}")
        ours = {n for names in COMMAND_FLAGS.values() for n in names}
        stray = [f"--{name}" for name in ours if fv[name].present
                 and name not in COMMAND_FLAGS[command]]
        if stray:
            raise UsageError(f"{command} does not take {', '.join(sorted(stray))}")
        return COMMANDS[command](fv, rest, list(argv))
    except UsageError as e:
        return _usage_error(str(e))
    except KeyboardInterrupt:  # before tune() started (tracing, loading): nothing written
        print(f"\ninterrupted; rerun with:\n  {_resume_command(list(argv))}", file=sys.stderr)
        return 130


def _usage_error(message: str) -> int:
    print(f"alt-tune: error: {message}\n\n{USAGE}", file=sys.stderr)
    return 2


def run() -> None:
    """The console script `alt-tune`."""
    sys.exit(main(sys.argv))
