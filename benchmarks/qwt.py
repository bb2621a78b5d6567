"""QwT (methods/qwt.py) on the bundled 6-block model and its outlier-stress variant: what it adds to repq-vit,
what the ridge and the number of images change, and whether 32 images over-fit.

    python benchmarks/qwt.py table   # repq-vit vs repq-vit+qwt, W4A4/W3A3, natural/stress, seeds 0,1,2
    python benchmarks/qwt.py ridge   # ridge × QwT images (32/128/512): R² on calibration vs held-out images, top-1

Prints plain-text lines (the measurements quoted in methods/qwt.py); writes no results store.
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402

import vitquant  # noqa: E402
from vitquant.bench import STRESS  # noqa: E402
from vitquant.calibration.data import data_config_for, load_calibration, load_labeled  # noqa: E402
from vitquant.calibration.engine import unit_io, unit_outputs  # noqa: E402
from vitquant.evaluate import predict_logits  # noqa: E402
from vitquant.methods.qwt import compensate, compensation_of  # noqa: E402
from vitquant.methods.reconstruction import float_teacher  # noqa: E402
from vitquant.models import prepare  # noqa: E402
from vitquant.models.outliers import inject_ln_outliers  # noqa: E402


def variants():
    model = vitquant.load_model("bundled")
    yield "natural", model
    yield f"stress S={STRESS['factor']:g}", inject_ln_outliers(model, **STRESS)


def top1(model, data) -> float:
    return float((predict_logits(model, data, progress=False).argmax(1) == data.labels).float().mean() * 100)


@torch.no_grad()
def heldout_r2(qmodel, teacher, images: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Per compensated unit, on `images` (X from the compensated quantized model, as at inference), with
    R = f(X) − f_q(X): (R² = 1 − ‖R − XW − b‖² / ‖R − mean R‖², error ratio ‖R − XW − b‖² / ‖R‖²)."""
    comp, out = compensation_of(qmodel), {}
    for name in comp.units:
        calls = unit_io(qmodel, name, images, 64, with_output=False)[0]
        y_comp = unit_outputs(qmodel.submodule(name), calls, 64).double()
        t = comp.term(name)
        x = calls.x.double()
        extra = x @ t.weight.double() + t.bias.double()
        r = unit_outputs(teacher.submodule(name), calls, 64).double() - (y_comp - extra)
        rr = r.reshape(-1, r.shape[-1])
        total = (rr - rr.mean(0)).pow(2).sum()
        left = (r - extra).pow(2).sum()
        out[name] = (float(1 - left / total), float(left / r.pow(2).sum()))
    return out


def table() -> None:
    data = None
    for variant, model in variants():
        data = data or load_labeled("bundled", data_config_for(model))
        print(f"{variant}: float top-1 {top1(model, data):.1f}", flush=True)
        for bits in ("w4a4", "w3a3"):
            for seed in (0, 1, 2):
                row = []
                for method in ("repq-vit", "repq-vit+qwt"):
                    t0 = time.perf_counter()
                    q = vitquant.quantize(model, vitquant.QuantConfig.preset(bits, method=method, seed=seed),
                                          "bundled", progress=False)
                    wall = time.perf_counter() - t0
                    comp = compensation_of(q)
                    extra = "" if comp is None else f", qwt step {comp.seconds:.2f} s, R² " + " ".join(
                        f"{r['r2']:.2f}" for r in comp.record.values() if "r2" in r)
                    row.append(f"{method} {top1(q, data):.1f} (calib {q.stats['calibration_seconds']:.1f} s, "
                               f"quantize wall {wall:.1f} s{extra})")
                print(f"  {variant} {bits.upper()} seed {seed}: " + " | ".join(row), flush=True)


def ridge() -> None:
    for variant, model in variants():
        cfg = data_config_for(model)
        data = load_labeled("bundled", cfg)
        pool = load_calibration("bundled", cfg, n=4000, seed=0).images  # seed 0's order: the first 32 = calib
        held_images = pool[-256:]
        for bits in ("w4a4",):
            base = vitquant.quantize(model, vitquant.QuantConfig.preset(bits, method="repq-vit"), "bundled",
                                     progress=False)
            teacher = float_teacher(prepare(model), model)
            print(f"{variant} {bits.upper()} repq-vit: top-1 {top1(base, data):.1f}", flush=True)
            for n in (32, 128, 512):
                for lam in (0.0, 1e-3, 1e-2, 1e-1, 1.0):
                    q = copy.deepcopy(base)
                    t_all = time.perf_counter()
                    t0 = time.perf_counter()
                    comp = compensate(q, pool[:n], teacher, ridge=lam)
                    seconds = time.perf_counter() - t0
                    fit = [r["r2"] for r in comp.record.values() if "r2" in r]
                    held = list(heldout_r2(q, teacher, held_images).values())
                    held_r2, ratio = [h[0] for h in held], [h[1] for h in held]
                    print(f"  {variant} {bits.upper()} QwT images {n:4d} ridge {lam:g}: top-1 {top1(q, data):.1f}, "
                          f"R² calib mean {sum(fit) / len(fit):.3f} [{' '.join(f'{r:.2f}' for r in fit)}], "
                          f"held-out mean {sum(held_r2) / len(held_r2):.3f} [{' '.join(f'{r:.2f}' for r in held_r2)}], "
                          f"held-out error ratio [{' '.join(f'{r:.2f}' for r in ratio)}], "
                          f"{seconds:.2f} s (line {time.perf_counter() - t_all:.0f} s)", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"table": table, "ridge": ridge}[sys.argv[1] if len(sys.argv) > 1 else "table"]()
