"""Two processes sweeping into one results store: every run is done once, and a claim dies with its process."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("fcntl")

SWEEPER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    from timm.models.vision_transformer import VisionTransformer
    import vitquant.bench as bench

    torch.set_num_threads(1)

    def tiny(name):
        torch.manual_seed(0)
        m = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=1,
                              num_heads=2).eval()
        m.pretrained_cfg = dict(input_size=(1, 28, 28), mean=(0.1307,), std=(0.3081,), crop_pct=1.0,
                                interpolation="bilinear")
        return m

    quantize = bench.quantize
    def slow_quantize(*args, **kwargs):  # widen the window in which two processes could pick one run
        time.sleep(0.3)
        return quantize(*args, **kwargs)

    bench.load_model, bench.quantize = tiny, slow_quantize
    store_path, me = Path(sys.argv[1]), sys.argv[2]
    (store_path.parent / f"ready-{me}").touch()
    while not (store_path.parent / "go").exists():
        time.sleep(0.01)
    images = str(store_path.parent / "images")  # a small ImageFolder: calibration and evaluation data
    spec = bench.SweepSpec(models=["tiny"], methods=["minmax"], bits=["w8a8", "w4a4"], seeds=[0, 1], stress=False,
                           calib_size=8, calib=images, eval_data=images)
    print("added", bench.run_sweep(spec, bench.ResultsStore(store_path), progress=False))
""")


def _spawn(tmp_path, *args):
    script = tmp_path / "worker.py"
    if not script.exists():
        script.write_text(SWEEPER)
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_sweeps_on_one_store_run_each_run_once(tmp_path):
    import numpy as np
    from PIL import Image

    for i in range(8):
        (tmp_path / "images" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (28, 28), dtype=np.uint8)).save(
            tmp_path / "images" / f"c{i % 2}" / f"{i}.png")
    store = tmp_path / "runs.jsonl"
    procs = [_spawn(tmp_path, store, i) for i in range(2)]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready-{i}").exists() for i in range(2)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    records = [json.loads(line) for line in store.read_text().splitlines()]
    keys = [(r["method"], r["bits"], r["seed"]) for r in records]
    # regression: both processes ran every run, so the store held duplicates the tables then averaged
    assert len(keys) == len(set(keys)) == 5  # the float reference and 2 bit widths x 2 seeds
    assert sum(int(out.split()[-1]) for out, _ in outs) == 5


HOLDER = textwrap.dedent("""
    import sys, time
    from vitquant.bench import ResultsStore

    rec = {"model": "m", "variant": "natural", "method": "minmax", "bits": "W8A8", "seed": 0, "calib_size": 8}
    with ResultsStore(sys.argv[1]).claim(rec) as mine:
        print("claimed" if mine else "busy", flush=True)
        time.sleep(120)
""")


def test_a_claim_is_released_when_its_process_dies(tmp_path):
    from vitquant.bench import ResultsStore

    (tmp_path / "holder.py").write_text(HOLDER)
    holder = subprocess.Popen([sys.executable, str(tmp_path / "holder.py"), str(tmp_path / "s.jsonl")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        rec = {"model": "m", "variant": "natural", "method": "minmax", "bits": "W8A8", "seed": 0, "calib_size": 8}
        store = ResultsStore(tmp_path / "s.jsonl")
        with store.claim(rec) as mine:
            assert not mine  # running elsewhere
        with store.claim({**rec, "seed": 1}) as mine:
            assert mine  # another run is free
    finally:
        holder.kill()
        holder.wait()
    with store.claim(rec) as mine:
        assert mine  # the kernel dropped the dead process's lock: no stale claim
