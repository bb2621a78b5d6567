"""Run by tests/test_distributed.py, once as a plain process and once under torchrun (2 gloo ranks):
`python distributed_worker.py OUT FOLDER`. Observes, quantizes and evaluates, writes what it found to
OUT/rank<r>.json and (rank 0) the quantized models to OUT/<method>/."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

import vitquant
from vitquant import distributed
from vitquant.calibration.observer import ReservoirObserver
from vitquant.calibration.data import data_config_for, load_labeled
from vitquant.calibration.datafree import DataFreeConfig, generate_calibration
from vitquant.config import QuantConfig
from vitquant.evaluate import predict_logits

METHODS = ("minmax", "percentile", "repq-vit", "fq-vit", "dopq-vit", "noisyquant")
CALIB = 64  # two batches of 32: one per rank (with 32 images, one batch, every rank observes it)
# noisyquant: its layer-wise search runs whole on every rank (not split), so it too must equal one process


def observed() -> dict:
    """A reservoir that must cut (20 of 75 rows kept), fed this rank's share of 5 batches, then reduced."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 5, 8, generator=g) * (1 + i) for i in range(5)]
    part = distributed.shard(len(batches))
    obs = ReservoirObserver(channel_axis=-1, max_elements=8 * 20, seed=7)
    for i in part:
        obs.start_batch(i)
        obs.update(batches[i])
    obs.reduce_across_ranks()
    return {"rows": obs.rows.tolist(), "lo": obs.lo.tolist(), "hi": obs.hi.tolist(), "count": obs.count}


def main(out: Path, folder: str) -> None:
    torch.set_num_threads(1)  # as torchrun sets for each rank
    distributed.init()
    try:
        results = {"world": distributed.world_size(), "observer": observed()}
        model = vitquant.load_model("bundled")
        for method in METHODS:
            q = vitquant.quantize(model, QuantConfig(method=method, w_bits=4, a_bits=4, calib_size=CALIB), "bundled",
                                  progress=False)
            res = vitquant.evaluate(q, "bundled", float_model=model, limit=400, progress=False)
            results[method] = [res.top1, res.top5, res.agreement, res.n]
            if distributed.is_main():
                vitquant.save(q, out / method)
        # reconstruction, data-parallel (gradients all-reduced): the same up to float summation order
        q = vitquant.quantize(model, QuantConfig(method="ias-vit", w_bits=4, a_bits=4, calib_size=32,
                                                 options={"iters": 10}), "bundled", progress=False)
        res = vitquant.evaluate(q, "bundled", limit=400, progress=False)
        preds = predict_logits(q, load_labeled("bundled", data_config_for(model), limit=400), progress=False)
        results["ias-vit"] = [res.top1, preds.argmax(1).tolist()]
        # APHQ-ViT / FIMA-Q: the sensitivity passes (APH map, Fisher probes) and the objectives' metrics are
        # split by image batch and all-reduced (64 images: 2 batches of 32), then data-parallel steps
        for method, options in (("aphq-vit", {"iters": 6}), ("fima-q", {"iters": 6, "rank": 2})):
            q = vitquant.quantize(model, QuantConfig(method=method, w_bits=4, a_bits=4, calib_size=CALIB,
                                                     options=options), "bundled", progress=False)
            preds = predict_logits(q, load_labeled("bundled", data_config_for(model), limit=400), progress=False)
            results[method] = [vitquant.evaluate(q, "bundled", limit=400, progress=False).top1,
                               preds.argmax(1).tolist()]
        # ERQ's ridge sums, split by statistics batch and all-reduced (64 images: 2 batches of 32)
        q = vitquant.quantize(model, QuantConfig(method="erq", w_bits=4, a_bits=4, calib_size=CALIB), "bundled",
                              progress=False)
        preds = predict_logits(q, load_labeled("bundled", data_config_for(model), limit=400), progress=False)
        results["erq"] = [vitquant.evaluate(q, "bundled", limit=400, progress=False).top1, preds.argmax(1).tolist()]
        # PSAQ-ViT generation: each rank generates its batches (seeded per batch), gathered in batch order
        images = generate_calibration(model, config=DataFreeConfig(n_images=CALIB, steps=4), progress=False).images
        results["data-free"] = images.double().sum(dim=(1, 2, 3)).tolist()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = vitquant.evaluate(model, folder, batch_size=4, progress=False)
        results["folder"] = [res.top1, res.top5, res.n, res.source, [str(w.message) for w in caught]]
        (out / f"rank{distributed.rank()}.json").write_text(json.dumps(results))
    finally:
        distributed.finish()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
