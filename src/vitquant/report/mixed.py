"""The mixed-precision and accuracy-target sections of a saved model's report.md: what the allocator
chose (per kind and bit width, not 100 site names), and the path the accuracy search took."""
from __future__ import annotations

from typing import Any

from vitquant.report.table import format_table

LISTED = 8  # a plan with more per-site entries is summarized (every entry is in quant_config.json)


def site_bits_cell(site_bits: dict[str, int]) -> str:
    if len(site_bits) <= LISTED:
        return ", ".join(f"{k}={v}" for k, v in site_bits.items())
    counts: dict[str, int] = {}
    for k, v in site_bits.items():
        key = f"{'weights' if k.endswith('.weight') else 'activations'} at {v} bits"
        counts[key] = counts.get(key, 0) + 1
    return f"{len(site_bits)} per-site entries ({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))}); " \
           "all in quant_config.json"


def mixed_sections(meta: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    mp = meta.get("mixed_precision")
    if mp:
        budget = ", ".join(x for x in (f"average {mp['budget']['avg_bits']:g} bits" if mp["budget"].get("avg_bits")
                                       else "", f"at most {mp['budget']['size_mb']:g} MB"
                                       if mp["budget"].get("size_mb") else "") if x)
        lines += ["## Mixed precision", "",
                  f"Chosen per site by the **{mp['criterion']}** criterion under {budget}; sensitivities measured with "
                  f"{mp['probe']} ({mp.get('table_seconds', 0):.0f} s).", "",
                  format_table(["weights (avg bits)", "activations (avg bits)", "planned size", "choices"],
                               [[f"{mp['avg_weight_bits']:.2f}", f"{mp['avg_act_bits']:.2f}",
                                 f"{mp['size_bytes'] / 1e6:.3f} MB",
                                 ", ".join(f"{k}×{v}" for k, v in mp["counts"].items())]]), ""]
        lines += [f"- {n}" for n in mp.get("notes", [])] + ([""] if mp.get("notes") else [])
    t = meta.get("accuracy_target")
    if t:
        rep = t["report"]
        lines += ["## Accuracy target", "",
                  f"Top-1 drop at most {t['max_drop']:g} points on {rep['validation']}: "
                  f"**{'met' if t['met_on_validation'] else 'missed'}** with {t['changed_points']} sites changed. "
                  f"On the {rep['data']} (never used to decide): top-1 {rep['top1']:.2f} % against float "
                  f"{rep['float_top1']:.2f} % (drop {rep['drop']:.2f}).", "", "The path it took:", "",
                  format_table(["phase", "sites raised", "validation top-1", "drop", "size", "met"],
                               [[s["phase"], s["changed"], f"{s['val_top1']:.2f}", f"{s['drop']:.2f}",
                                 f"{s['size_bytes'] / 1e6:.3f} MB", "yes" if s["met"] else "no"]
                                for s in t["path"]]), ""]
    return lines
