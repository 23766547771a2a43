"""What a records file says about tuning: the `alt-tune show` table and `alt-tune plot` curves.

Entry points: load(path, device) / summarize(records, device) -> [ModelReport],
format_report(reports) -> str (with equal_budget_lines(report) when a model has several
run kinds), plot(reports, out) -> [paths written], columns(rows, right),
format_ms(seconds), short_label(label).
Reads records only (never builds or measures).

Per model (the records' "model" label) and op (op_key): untuned = the fastest ok measurement
of the heuristic's knobs (every run measures them first, so runs of different modes share
one baseline); tuned = the fastest ok record of one (mode, search) variant; speedup =
untuned / tuned. Where a variant has a confirmation pass for the op (the tuner re-timed the
heuristic and its best candidates together), tuned is that pass's choice, as optimize()
chooses, and the speedup is against the heuristic's time in the same pass. The whole model
sums time x multiplicity over the ops that have both.
A file holding several variants (joint vs loop_only, model vs random) gives a column group
per variant, so an ablation reads as one table.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import textwrap
from typing import Optional

from alt_jax.records import confirm_pass, latest_passes, pass_choice, record_time

NO_MODEL = "(no model label)"


def variant_of(rec) -> str:
    """'mode/search' of a record (records without them: the driver's defaults)."""
    return f"{rec.get('mode') or 'joint'}/{rec.get('search') or 'model'}"


@dataclasses.dataclass
class VariantResult:
    """One op under one (mode, search): its records in time order and what they reached."""

    records: list = dataclasses.field(default_factory=list)
    confirmation: list = dataclasses.field(default_factory=list)  # its latest pass

    @property
    def trials(self) -> int:
        return len(self.records)

    @property
    def best(self) -> Optional[dict]:
        """The record optimize() would use: the confirmation pass's choice if there is one,
        else the fastest ok record."""
        chosen = pass_choice(self.confirmation)
        if chosen is not None:
            return chosen
        ok = [r for r in self.records if record_time(r) is not None]
        return min(ok, key=record_time) if ok else None

    @property
    def confirmed_untuned_s(self) -> Optional[float]:
        """The heuristic's time in the confirmation pass (None without one)."""
        return next((record_time(r) for r in self.confirmation if r.get("heuristic")), None)

    @property
    def best_s(self) -> Optional[float]:
        return record_time(self.best) if self.best else None

    def curve(self, start: Optional[float]) -> list:
        """Best-so-far time after each of this variant's trials (None before the first ok
        one when there is no start value)."""
        out, best = [], start
        for rec in self.records:
            t = record_time(rec)
            if t is not None and (best is None or t < best):
                best = t
            out.append(best)
        return out


@dataclasses.dataclass
class OpReport:
    op_key: str
    label: str
    multiplicity: int
    untuned_s: Optional[float]            # fastest ok heuristic record, any variant
    variants: dict                        # variant name -> VariantResult

    def untuned_for(self, variant: str) -> Optional[float]:
        """The untuned time a variant's speedup is against: the heuristic's time in its
        confirmation pass, else the fastest heuristic measurement."""
        v = self.variants.get(variant)
        return (v.confirmed_untuned_s if v else None) or self.untuned_s

    def speedup(self, variant: str) -> Optional[float]:
        v = self.variants.get(variant)
        untuned = self.untuned_for(variant)
        if v is None or v.best_s is None or untuned is None:
            return None
        return untuned / v.best_s


@dataclasses.dataclass
class ModelReport:
    model: str
    device: str
    ops: list                             # [OpReport] in first-recorded order
    variants: list                        # variant names in first-recorded order

    def whole(self, variant: str) -> tuple:
        """(untuned, tuned) sums of time x multiplicity over the ops that have both for this
        variant, and how many ops that is."""
        both = [op for op in self.ops if op.speedup(variant) is not None]
        untuned = sum(op.untuned_for(variant) * op.multiplicity for op in both)
        tuned = sum(op.variants[variant].best_s * op.multiplicity for op in both)
        return untuned, tuned, len(both)

    def model_curve(self, variant: str) -> tuple:
        """(cumulative trials, weighted sum of best-so-far times) for one variant, records in
        timestamp order, each op starting at its untuned time; ops without one are left out
        (as in whole())."""
        ops = {op.op_key: op for op in self.ops if op.untuned_s is not None}
        best = {k: op.untuned_s for k, op in ops.items()}
        recs = sorted((r for op in ops.values() if variant in op.variants
                       for r in op.variants[variant].records),
                      key=lambda r: r.get("timestamp", 0.0))
        total = lambda: sum(best[k] * ops[k].multiplicity for k in best)
        xs, ys = [0], [total()]
        for i, rec in enumerate(recs, 1):
            t = record_time(rec)
            if t is not None and t < best[rec["op_key"]]:
                best[rec["op_key"]] = t
            xs.append(i)
            ys.append(total())
        return xs, ys


def summarize(records, device: Optional[str]) -> list:
    """ModelReports of records (dicts as RecordStore.records() gives them) for one device
    fingerprint, or every device when device is None (one report per device and model)."""
    recs = sorted((r for r in records if device is None or r["device"] == device),
                  key=lambda r: r.get("timestamp", 0.0))
    grouped: dict = {}  # (device, model) -> op_key -> [records]
    for rec in recs:
        ops = grouped.setdefault((rec["device"], rec.get("model") or NO_MODEL), {})
        ops.setdefault(rec["op_key"], []).append(rec)
    reports = []
    for (dev, model), ops in grouped.items():
        variants = list(dict.fromkeys(variant_of(r) for op_recs in ops.values()
                                      for r in op_recs))
        op_reports = []
        for op_key, op_recs in ops.items():
            heuristic = [record_time(r) for r in op_recs
                         if r.get("heuristic") and confirm_pass(r) is None]
            heuristic = [t for t in heuristic if t is not None]
            by_variant: dict = {}
            for r in op_recs:
                result = by_variant.setdefault(variant_of(r), VariantResult())
                if confirm_pass(r) is None:
                    result.records.append(r)
            for v, recs in latest_passes(op_recs, variant_of).items():
                by_variant[v].confirmation = recs
            label = next((r["op"] for r in op_recs if isinstance(r.get("op"), str)),
                         f"{op_recs[0]['family']} {op_recs[0]['workload_key']}")
            mult = max((r["multiplicity"] for r in op_recs
                        if isinstance(r.get("multiplicity"), int)), default=1)
            op_reports.append(OpReport(op_key, label, mult,
                                       min(heuristic) if heuristic else None, by_variant))
        reports.append(ModelReport(model, dev, op_reports, variants))
    return reports


# ---- the table ----------------------------------------------------------------------------
def format_ms(t: Optional[float]) -> str:
    """Milliseconds with at least 3 decimals and 4 significant digits (a 4 us kernel is
    0.004354, not 0.004)."""
    if t is None:
        return "-"
    ms = t * 1e3
    decimals = 3 if ms >= 1 or ms <= 0 else min(9, 3 - math.floor(math.log10(ms)))
    return f"{ms:.{decimals}f}"


def short_label(label: str) -> str:
    """An op label with its primitive abbreviated (conv, dot), for narrow places."""
    return label.replace("conv_general_dilated", "conv", 1).replace("dot_general", "dot", 1)


def _x(s: Optional[float]) -> str:
    return "-" if s is None else f"{s:.2f}x"


def _scalar(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def describe_choice(rec: Optional[dict]) -> str:
    """'family | layout k=v ... | knobs k=v ...' of a record (knobs repeated in the layout,
    its layout-kind axes, are not shown twice)."""
    if rec is None:
        return "-"
    layout = " ".join(f"{k}={_scalar(v)}" for k, v in sorted(rec["layout"].items()))
    knobs = " ".join(f"{k}={_scalar(v)}" for k, v in sorted(rec["knobs"].items())
                     if rec["layout"].get(k, object()) != v)
    heur = " (heuristic)" if rec.get("heuristic") else ""
    return (f"{rec['family']}{heur}" + (f" | layout {layout}" if layout else "")
            + (f" | knobs {knobs}" if knobs else ""))


def columns(rows: list, right: set) -> list:
    """rows of cells -> lines, each column as wide as its widest cell (the last column is
    not padded)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


def format_report(reports: list) -> str:
    """One table per model: a row per op (numbers, then its label), the chosen knobs on the
    line below it, and a whole-model row."""
    out = []
    for rep in reports:
        variants = rep.variants
        out.append(f"== {rep.model}  ({len(rep.ops)} ops; device {rep.device})")
        head = ["#", "x", "untuned ms"]
        for v in variants:
            head += [f"{v} ms", "speedup", "trials"]
        head.append("op")
        rows = [head]
        for i, op in enumerate(rep.ops, 1):
            row = [str(i), str(op.multiplicity), format_ms(op.untuned_s)]
            for v in variants:
                res = op.variants.get(v)
                row += [format_ms(res.best_s if res else None), _x(op.speedup(v)),
                        str(res.trials if res else 0)]
            row.append(op.label)
            rows.append(row)
        with_untuned = [op for op in rep.ops if op.untuned_s is not None]
        whole = ["all", "", format_ms(sum(op.untuned_s * op.multiplicity for op in with_untuned))
                 if with_untuned else "-"]
        notes = []
        for v in variants:
            untuned, tuned, n = rep.whole(v)
            whole += [format_ms(tuned) if n else "-", _x(untuned / tuned) if n else "-",
                      str(sum(op.variants[v].trials for op in rep.ops if v in op.variants))]
            if n < len(rep.ops):
                notes.append(f"{v}: the whole model counts {n} of {len(rep.ops)} ops (the "
                             f"others have no untuned or no ok tuned time)")
        whole.append("whole model: sum of time x multiplicity")
        rows.append(whole)
        right = set(range(len(head) - 1))
        lines = columns(rows, right)
        # The chosen config under each op row (long; the numbers stay aligned above it).
        table = [lines[0]]
        for i, op in enumerate(rep.ops, 1):
            table.append(lines[i])
            for v in variants:
                res = op.variants.get(v)
                tag = f" [{v}]" if len(variants) > 1 else ""
                table.append(f"      chosen{tag}: {describe_choice(res.best if res else None)}")
        table.append(lines[-1])
        out += table + [f"note: {n}" for n in notes] + equal_budget_lines(rep) + [""]
    return "\n".join(out).rstrip() + "\n"


def equal_budget_lines(rep) -> list:
    """With several run kinds: the whole model's best-so-far (search trials, as the curves)
    of each at the budget of the shortest run, and after all of its trials."""
    if len(rep.variants) < 2:
        return []
    curves = {v: rep.model_curve(v) for v in rep.variants}
    n = min(len(xs) - 1 for xs, _ in curves.values())
    base = next(iter(curves.values()))[1][0]
    if n < 1 or not base:
        return []
    out = [f"equal budget: whole model (search trials, best so far) after {n} trials of each "
           f"run kind; untuned {format_ms(base)} ms"]
    for v, (xs, ys) in curves.items():
        out.append(f"  {v:<16} {format_ms(ys[n])} ms ({base / ys[n]:.3f}x); after all "
                   f"{xs[-1]} trials {format_ms(ys[-1])} ms ({base / ys[-1]:.3f}x)")
    return out


# ---- the plot -----------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


def output_paths(reports: list, out: str) -> list:
    """out itself for one report; out with '-<model>' before its extension for several."""
    if len(reports) == 1:
        return [out]
    stem, ext = os.path.splitext(out)
    names = [_slug(r.model if len({x.device for x in reports}) == 1
                   else f"{r.model}-{r.device}") for r in reports]
    # Distinct names even if two labels slug alike.
    return [f"{stem}-{n}{'-' + str(i) if names.count(n) > 1 else ''}{ext or '.png'}"
            for i, n in enumerate(names)]


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def plot(reports: list, out: str) -> list:
    """Writes one PNG per report (output_paths): a panel with the whole model's weighted
    best-so-far time vs cumulative trials, then one per op with its best-so-far time / its
    untuned time vs trial; one line per variant. Returns the paths written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise PlotUnavailable("matplotlib is not installed (pip install matplotlib, or "
                              "pip install 'alt_jax[tune]'): no plot written") from None
    paths = output_paths(reports, out)
    for rep, path in zip(reports, paths):
        n = 1 + len(rep.ops)
        cols = min(4, n)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
        flat = [ax for row in axes for ax in row]
        colors = {v: f"C{i}" for i, v in enumerate(rep.variants)}
        ax = flat[0]
        for v in rep.variants:
            xs, ys = rep.model_curve(v)
            if len(xs) > 1 and ys[0] > 0:
                ax.step(xs, [y * 1e3 for y in ys], where="post", color=colors[v], label=v,
                        marker=".", markersize=3)
        if rep.variants and rep.model_curve(rep.variants[0])[1]:
            ax.axhline(rep.model_curve(rep.variants[0])[1][0] * 1e3, color="gray",
                       linestyle="--", linewidth=0.8, label="untuned")
        ax.set_title(f"{rep.model}: whole model", fontsize=9)
        ax.set_xlabel("trials (all ops)", fontsize=8)
        ax.set_ylabel("sum of time x multiplicity (ms)", fontsize=8)
        ax.legend(fontsize=7)
        for ax, op in zip(flat[1:], rep.ops):
            base = op.untuned_s
            for v in rep.variants:
                res = op.variants.get(v)
                if res is None:
                    continue
                ys = res.curve(base)
                norm = base or next((y for y in ys if y is not None), None)
                if norm is None:
                    continue
                xs = [i for i, y in enumerate(ys, 1) if y is not None]
                ax.step(xs, [y / norm for y in ys if y is not None], where="post",
                        color=colors[v], label=v, marker=".", markersize=3)
            ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
            ax.set_title(textwrap.fill(f"x{op.multiplicity} {short_label(op.label)}", 56),
                         fontsize=7)
            ax.set_xlabel("trial", fontsize=8)
            ax.set_ylabel("best / untuned" if base else "best / first ok", fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in flat[:n]:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for ax in flat[n:]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return paths


def load(path: str, device: Optional[str]) -> list:
    """summarize() of a records file (malformed lines skipped with one warning)."""
    from alt_jax.records import RecordStore

    return summarize(RecordStore(path).records(), device)


def devices_in(path: str) -> dict:
    """device fingerprint -> how many records of the file name it."""
    from alt_jax.records import RecordStore

    counts: dict = {}
    for r in RecordStore(path).records():
        counts[r["device"]] = counts.get(r["device"], 0) + 1
    return counts

