"""Option types the command lines share."""

from __future__ import annotations

import math

import click


class FiniteRange(click.FloatRange):
    """click.FloatRange without NaN: every comparison with NaN is false, so FloatRange lets
    `nan` through any bound (`--check-every nan` made a wait that never ends)."""

    def convert(self, value, param, ctx):  # noqa: ANN001 - click's signature
        rv = super().convert(value, param, ctx)
        if math.isnan(rv):
            self.fail(f"{value!r} is not a number.", param, ctx)
        return rv
