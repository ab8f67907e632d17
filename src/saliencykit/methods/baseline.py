"""The `random` method: a uniform-random map per image, the baseline every comparison needs.

Registered in the method registry (`explain(..., method="random")`) with the other families.
Same seed, same maps (as `Explanation.random_like`).
"""
from __future__ import annotations

import torch

from ..subject import channel_axis
from .base import ANY_LAYOUT, Method, register


@register
class RandomMap(Method):
    name = "random"
    family = "baseline"
    cost = "0"
    signed = False
    randomized = True
    defaults = {}
    layouts = ANY_LAYOUT   # a map of the input's shape without its channel axis, whatever the layout
    description = "Uniform random map in [0,1) per pixel: the chance-level baseline for every metric."

    def run(self, ctx, target, layer):
        g = torch.Generator().manual_seed(0 if ctx.seed is None else int(ctx.seed))
        axis = channel_axis(ctx.layout)
        shape = tuple(v for i, v in enumerate(ctx.x.shape) if i != axis)
        return {"maps": torch.rand(shape, generator=g)}
