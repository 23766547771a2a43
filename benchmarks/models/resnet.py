"""ResNet-18 and ResNet-50 (He et al. 2016), inference, as NHWC/HWIO or NCHW/OIHW programs.

Entry point: build(depth, layout, batch) -> Model. 224x224 RGB input, 1000 classes.
"""
from __future__ import annotations

import jax

from benchmarks.models.common import (Layout, Model, Params, batch_norm, conv,
                                      global_avg_pool, max_pool)

# (block kind, blocks per stage)
_CONFIGS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
            50: ("bottleneck", (3, 4, 6, 3))}
_WIDTHS = (64, 128, 256, 512)


def _init(depth: int, layout: Layout, seed: int = 0) -> dict:
    kind, stages = _CONFIGS[depth]
    p = Params(seed)
    expansion = 4 if kind == "bottleneck" else 1
    params = {"stem": {"w": p.conv(layout, 7, 7, 3, 64), "bn": p.batch_norm(64)}, "stages": []}
    cin = 64
    for stage, (width, blocks) in enumerate(zip(_WIDTHS, stages)):
        stage_params = []
        for b in range(blocks):
            stride = 2 if (b == 0 and stage > 0) else 1
            cout = width * expansion
            if kind == "basic":
                block = {"conv1": p.conv(layout, 3, 3, cin, width), "bn1": p.batch_norm(width),
                         "conv2": p.conv(layout, 3, 3, width, width), "bn2": p.batch_norm(width)}
            else:
                block = {"conv1": p.conv(layout, 1, 1, cin, width), "bn1": p.batch_norm(width),
                         "conv2": p.conv(layout, 3, 3, width, width), "bn2": p.batch_norm(width),
                         "conv3": p.conv(layout, 1, 1, width, cout), "bn3": p.batch_norm(cout)}
            if stride != 1 or cin != cout:
                block["proj"] = p.conv(layout, 1, 1, cin, cout)
                block["proj_bn"] = p.batch_norm(cout)
            block["stride"] = stride
            stage_params.append(block)
            cin = cout
        params["stages"].append(stage_params)
    params["fc"] = {"w": p.normal((cin, 1000), 1.0 / cin ** 0.5), "b": p.normal((1000,), 0.01)}
    return params


def _block(x, bp, layout: Layout, kind: str):
    stride = bp["stride"]
    relu = jax.nn.relu
    if kind == "basic":
        y = relu(batch_norm(conv(x, bp["conv1"], layout, stride), bp["bn1"], layout))
        y = batch_norm(conv(y, bp["conv2"], layout), bp["bn2"], layout)
    else:
        y = relu(batch_norm(conv(x, bp["conv1"], layout), bp["bn1"], layout))
        y = relu(batch_norm(conv(y, bp["conv2"], layout, stride), bp["bn2"], layout))
        y = batch_norm(conv(y, bp["conv3"], layout), bp["bn3"], layout)
    if "proj" in bp:
        x = batch_norm(conv(x, bp["proj"], layout, stride), bp["proj_bn"], layout)
    return relu(x + y)


def build(depth: int, layout_name: str = "nhwc", batch: int = 1) -> Model:
    layout = Layout(layout_name)
    kind, _ = _CONFIGS[depth]
    params = _init(depth, layout)
    # Strides are static structure, not weights: keep them out of the params pytree.
    strides = [[block.pop("stride") for block in stage] for stage in params["stages"]]

    def apply(params, x):
        x = jax.nn.relu(batch_norm(conv(x, params["stem"]["w"], layout, 2), params["stem"]["bn"],
                                   layout))
        x = max_pool(x, layout)
        for stage, stage_strides in zip(params["stages"], strides):
            for bp, stride in zip(stage, stage_strides):
                x = _block(x, {**bp, "stride": stride}, layout, kind)
        x = global_avg_pool(x, layout)
        return x @ params["fc"]["w"] + params["fc"]["b"]

    x = Params(seed=1).normal(layout.input_shape(batch, 224, 3), 1.0)
    return Model(f"resnet{depth}-{layout_name}", apply, params, (x,))
