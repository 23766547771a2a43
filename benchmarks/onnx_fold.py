"""The clean-up a deployment exporter (torch.onnx, tf2onnx) leaves in a graph, applied to
ours so onnxruntime's own fusions fire and the peer runs at its real speed: constant
subgraphs folded to initializers, x - c as x + (-c), x / c as x * (1/c), max(x, 0) as Relu,
min(Relu(x), 6) as Clip(x, 0, 6). With it ORT folds the BN chain into the convs and fuses
Conv+Relu (ResNet-50 NCHW: 70 ms unfolded).

Entry point: fold(model) -> onnx.ModelProto.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator


def _const(consts, name):
    return consts.get(name) if name else None


def fold(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = model.graph
    consts = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    nodes = []
    for node in graph.node:
        ins = [i for i in node.input if i]
        if ins and all(i in consts and i not in graph_inputs for i in ins):
            outs = ReferenceEvaluator(node).run(None, {i: consts[i] for i in ins})
            for name, value in zip(node.output, outs):
                consts[name] = np.asarray(value)
            continue
        nodes.append(node)

    rewritten, produced_by_relu = [], set()
    for node in nodes:
        a, b = (list(node.input) + [None, None])[:2]
        cb = _const(consts, b)
        if node.op_type == "Sub" and cb is not None and a not in consts:
            name = f"{b}__neg"
            consts[name] = -cb
            node = helper.make_node("Add", [a, name], list(node.output), name=node.name)
        elif node.op_type == "Div" and cb is not None and a not in consts:
            name = f"{b}__recip"
            consts[name] = (1.0 / cb).astype(cb.dtype)
            node = helper.make_node("Mul", [a, name], list(node.output), name=node.name)
        elif node.op_type == "Max":
            ca = _const(consts, a)
            x, c = (b, ca) if ca is not None else (a, cb)
            if c is not None and c.size == 1 and float(c.reshape(-1)[0]) == 0.0:
                node = helper.make_node("Relu", [x], list(node.output), name=node.name)
                produced_by_relu.update(node.output)
        elif node.op_type == "Min":
            ca = _const(consts, a)
            x, c = (b, ca) if ca is not None else (a, cb)
            producer = next((n for n in rewritten if x in n.output), None)
            if (c is not None and c.size == 1 and x in produced_by_relu and producer is not None
                    and producer.op_type == "Relu"):
                lo, hi = f"{node.output[0]}__lo", f"{node.output[0]}__hi"
                consts[lo], consts[hi] = np.zeros((), c.dtype), c.reshape(())
                node = helper.make_node("Clip", [producer.input[0], lo, hi], list(node.output),
                                        name=node.name)
        rewritten.append(node)

    # Drop nodes nothing reads any more (a Relu whose only reader became a Clip).
    needed = {o.name for o in graph.output}
    live = []
    for node in reversed(rewritten):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
    rewritten = live[::-1]
    used = {i for n in rewritten for i in n.input} | {o.name for o in graph.output}
    initializers = [numpy_helper.from_array(np.asarray(v), name) for name, v in consts.items()
                    if name in used and name not in graph_inputs]
    new_graph = helper.make_graph(rewritten, graph.name, list(graph.input), list(graph.output),
                                  initializers)
    folded = helper.make_model(new_graph, opset_imports=list(model.opset_import),
                               ir_version=model.ir_version)
    onnx.checker.check_model(folded)
    return folded
