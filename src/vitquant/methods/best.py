"""`best`: the recipe this project measured to be the strongest, per bit width — the one to use when in doubt.

It is not an algorithm of its own: for the config's bit widths it runs one registered recipe (a method,
its options, optionally `+qwt`) from `RECIPES`, chosen from benchmarks/results/accuracy.md. The condition
it is held to, checked by tests/methods/test_best.py over the committed results store: on every reference
model and stress variant where its recipe has 3 calibration seeds, at W4A4 and W3A3, its mean top-1 is never
below the best single registered method's mean by more than one standard error of the test set
(√(p(1−p)/n), p that method's accuracy, n the test images). What it was measured on, and what it was not,
is in RECIPES' comments and accuracy_notes.md.

`quantize()` resolves `best` before anything else (`resolve`), so the quantized model records, saves and
loads as the recipe it ran (e.g. `ias-vit+qwt`), with `stats["recipe"]` saying it came from `best`.
"""
from __future__ import annotations

import dataclasses

from vitquant.config import parse_method_spec
from vitquant.methods.base import Method

# min(w_bits, a_bits) at most → the recipe (a `vitquant bench` method spec); the first row that applies wins.
# Measured (benchmarks/results/accuracy.md, 1000 test images, one standard error ≈ 0.6-0.7 points):
# - ≤ 3 bits, fima-q: W3A3 top-1 (3 seeds) 6-block natural 95.77 (best stored: adalog 96.23), stress 95.97
#   (adalog, one seed: 96.5); 12-block retrained stress 94.93 (95.3 / 95.2 / 94.3), the best there with 3
#   seeds (erq 94.80, repq-vit+qwt 94.40; aphq-vit 95.0 at seed 0 only). repq-vit+qwt (~1 s instead of
#   minutes) is within one standard error everywhere too and is the cheap alternative.
# - 4-8 bits, repq-vit: at W4A4 every strong method is at float accuracy on these models (6-block 96.2 /
#   96.3, 12-block retrained stress 95.7 vs erq:sequential=false 95.9), and QwT adds nothing measurable there
#   (12-block retrained stress 95.4 with it).
RECIPES: tuple[tuple[int, str], ...] = ((3, "fima-q"), (8, "repq-vit"))


def recipe_for(w_bits: int, a_bits: int) -> str:
    """The method spec `best` runs at these bit widths."""
    low = min(w_bits, a_bits)
    return next(spec for most, spec in RECIPES if low <= most)


def resolve(config):
    """`config` with method "best" replaced by its recipe (method and options); other configs unchanged."""
    if config.method != Best.name:
        return config
    name, options = parse_method_spec(recipe_for(config.w_bits, config.a_bits))
    return dataclasses.replace(config, method=name, options=options)


class Best(Method):
    name = "best"
    summary = "the strongest recipe measured here for the bit widths (see `vitquant.methods.best.RECIPES`)"

    def calibrate(self, ctx) -> None:
        from vitquant.methods import get_method  # late: the registry imports this module

        config = resolve(ctx.config)
        get_method(config.method)().calibrate(dataclasses.replace(ctx, config=config))
