"""Each peer on the program layout it runs best.

A zoo model can be built as an NHWC or an NCHW program (benchmarks.models.forms). The peers
do not run them alike: OpenVINO runs the NHWC ONNX graph, with a transpose around every
conv, much slower than the NCHW one (ResNet-50 57.8 vs 40.4 ms here), and jax.jit the other
way round. A fair table times each peer on its better form: every form's peer is built, a
few interleaved selection rounds pick the faster, and the row says which it ran.

Entry points: PEER_COLUMNS (--peers key -> column name), build_peer(key, model, spinning),
on_best_form(key, forms, own, config, spinning) -> Peer.
"""
from __future__ import annotations

import dataclasses

from benchmarks import peers, timing

# --peers key -> the column name; "xla" (jax.jit) is always timed: it is the reference
PEER_COLUMNS = {"xla": "jax.jit", "xla_eigen": "jax.jit (eigen)",
                "onnxruntime": "onnxruntime", "openvino": "OpenVINO"}
SELECTION = timing.MeasureConfig(warmup=1, repeat=5, min_round_ms=20.0)


def build_peer(key: str, model, spinning: bool = False) -> peers.Peer:
    """The peer named key on model's own program (PeerUnavailable if it is not installed)."""
    args = (model.params, *model.inputs)
    if key == "xla":
        return peers.xla_peer(model.apply)
    if key == "xla_eigen":
        return peers.xla_eigen_peer(model.apply, *args)
    if key == "onnxruntime":
        return peers.onnxruntime_peer(model.apply, model.params, *model.inputs,
                                      spinning=spinning)
    if key == "openvino":
        return peers.openvino_peer(model.apply, model.params, *model.inputs)
    raise ValueError(f"unknown peer {key!r}; choose from {sorted(PEER_COLUMNS)}")


@dataclasses.dataclass(frozen=True)
class FormPeer:
    """A peer bound to one form of the workload: called with the row's arguments, it runs on
    its form's own params and inputs (the same network, shapes and FLOPs). `form` is the
    Model it runs, whose jax.jit output its answers are checked against."""

    peer: peers.Peer
    form: object
    settings: dict

    @property
    def name(self) -> str:
        return self.peer.name

    def __call__(self, *row_args):
        del row_args  # the row's program is another layout: this peer runs its own form's
        return self.peer(self.form.params, *self.form.inputs)


def on_best_form(key: str, forms: dict, own: str, config: timing.MeasureConfig = SELECTION,
                 spinning: bool = False):
    """The peer named key on the form of `forms` ({layout: Model}) it runs fastest, chosen by
    a few interleaved rounds (config); with one form, that form's peer as it is. The
    returned callable takes the row's arguments (those of forms[own]); its settings carry
    program_layout and, when there was a choice, the selection medians."""
    built = {layout: build_peer(key, model, spinning) for layout, model in forms.items()}
    if len(built) == 1:
        (layout, peer), = built.items()
        return dataclasses.replace(peer, settings={**peer.settings, "program_layout": layout})
    times = timing.interleaved(
        {layout: FormPeer(peer, forms[layout], peer.settings) for layout, peer in built.items()},
        (), config)
    best = min(times, key=lambda layout: times[layout].median)
    settings = {**built[best].settings, "program_layout": best,
                "selection_ms": {layout: round(t.median * 1e3, 3) for layout, t in times.items()}}
    if best == own:
        return dataclasses.replace(built[best], settings=settings)
    return FormPeer(built[best], forms[best], settings)
