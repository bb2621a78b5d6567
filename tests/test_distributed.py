"""Data parallelism under torch.distributed: 2 gloo processes on the CPU must compute exactly what one
process computes — the same evaluation counts and bit-identical quantizers — and only rank 0 writes."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vitquant
from vitquant import distributed
from vitquant.datasets.mnist import mnist5k_split
from vitquant.serialization import META, WEIGHTS

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
METHODS = ("minmax", "percentile", "repq-vit", "fq-vit", "dopq-vit", "noisyquant")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shard_covers_every_item_exactly_once_in_order():
    for n in (0, 1, 5, 10, 11):
        for parts in (1, 2, 3, 4):
            pieces = [distributed.shard(n, parts, i) for i in range(parts)]
            assert [i for p in pieces for i in p] == list(range(n))
            assert max(map(len, pieces)) - min(map(len, pieces)) <= 1


def test_helpers_are_identities_in_one_process():
    t = torch.tensor([3.0, -1.0])
    assert not distributed.is_distributed() and distributed.rank() == 0 and distributed.is_main()
    assert torch.equal(distributed.all_reduce(t, "max"), t) and torch.equal(distributed.all_gather_rows(t), t)
    assert distributed.init() is False  # WORLD_SIZE unset: no process group is started


def _image_folder(root: Path) -> Path:
    """An ImageFolder of 3 MNIST digits × 7 images plus one undecodable file."""
    images, labels = mnist5k_split("test", normalize=False)
    for digit in range(3):
        (root / str(digit)).mkdir(parents=True)
        picks = (labels == digit).nonzero().flatten()[:7]
        for j, i in enumerate(picks.tolist()):
            Image.fromarray((images[i, 0] * 255).round().byte().numpy(), mode="L").save(root / str(digit) / f"{j}.png")
    (root / "1" / "broken.png").write_bytes(b"not a png")
    return root


WORKER = Path(__file__).with_name("distributed_worker.py")


def _torchrun(*args: str, cwd: Path, module: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), *(["-m", "vitquant"] if module else []), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same work done by one process and by 2 gloo ranks under torchrun (1 thread each)."""
    root = tmp_path_factory.mktemp("distributed")
    folder = _image_folder(root / "folder")
    for name in ("one", "two"):
        (root / name).mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, str(WORKER), str(root / "one"), str(folder)], capture_output=True,
                          text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    done = _torchrun(str(WORKER), str(root / "two"), str(folder), cwd=root, module=False)
    assert done.returncode == 0, done.stderr[-3000:]
    single = json.loads((root / "one" / "rank0.json").read_text())
    ranks = [json.loads((root / "two" / f"rank{r}.json").read_text()) for r in range(2)]
    assert single["world"] == 1 and ranks[0]["world"] == ranks[1]["world"] == 2
    return root, single, ranks


def test_observer_reduction_equals_one_process_observing_every_batch(runs):
    _, single, ranks = runs
    assert ranks[0]["observer"] == ranks[1]["observer"] == single["observer"]
    assert single["observer"]["count"] == 75 and len(single["observer"]["rows"]) == 20


def test_evaluation_counts_are_exactly_the_single_process_ones(runs):
    _, single, ranks = runs
    for key in METHODS:
        assert ranks[0][key] == ranks[1][key] == single[key], key
    assert ranks[0]["folder"][:4] == ranks[1]["folder"][:4] == single["folder"][:4]  # [4]: this rank's warnings
    assert single["minmax"][3] == 400 and single["folder"][2] == 21 and "1 unreadable skipped" in single["folder"][3]
    assert any("skipped 1 unreadable" in w for w in single["folder"][4])


@pytest.mark.parametrize("method", ["ias-vit", "erq", "aphq-vit", "fima-q"])
def test_data_parallel_sums_match_one_process_within_tolerance(runs, method):
    """ias-vit's block reconstruction (each step's batch split between the ranks, gradients summed) and ERQ's
    ridge statistics (each rank sums its batches, sums all-reduced), aphq-vit's and fima-q's sensitivity passes
    (split by image batch, all-reduced) and their reconstruction with QDrop (each rank's own masks): the same
    sums added in another order, so the models agree on nearly every image rather than bit for bit."""
    _, single, ranks = runs
    assert ranks[0][method] == ranks[1][method]  # every rank ends with the same model
    (top1, preds), (top1_dp, preds_dp) = single[method], ranks[0][method]
    assert abs(top1 - top1_dp) <= 1.0
    assert sum(a == b for a, b in zip(preds, preds_dp)) / len(preds) >= 0.97


def test_data_free_generation_split_by_batch_gives_the_same_images(runs):
    _, single, ranks = runs
    assert len(single["data-free"]) == 64
    assert ranks[0]["data-free"] == ranks[1]["data-free"] == single["data-free"]


@pytest.mark.parametrize("method", METHODS)
def test_calibration_gives_bit_identical_quantizers(runs, method):
    root, _, _ = runs
    one, two = root / "one" / method, root / "two" / method
    assert json.loads((two / META).read_text())["quantizers"] == json.loads((one / META).read_text())["quantizers"]
    a, b = load_file(one / WEIGHTS), load_file(two / WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (root / "two" / f"{method}.tmp").exists()


def test_torchrun_cli_eval_and_quantize(tmp_path):
    """`torchrun -m vitquant`: eval prints once, with the single-process numbers; quantize writes one directory."""
    from vitquant.cli import main

    done = _torchrun("quantize", "--method", "minmax", "--bits", "w8a8", "--calib-size", "64", "--quiet",
                     "--out", str(tmp_path / "q"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("quantized bundled with minmax") == 1
    assert vitquant.load(tmp_path / "q") is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temporary sibling left behind
    done = _torchrun("eval", str(tmp_path / "q"), "--limit", "400", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if "top-1" in line]
    assert len(lines) == 1
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["eval", str(tmp_path / "q"), "--limit", "400", "--quiet"]) == 0
    assert lines[0] == buf.getvalue().strip().splitlines()[0]


def test_torchrun_eval_in_onnx_runtime_gives_the_single_process_counts(tmp_path):
    """ONNX Runtime sessions are evaluated through the same sharded loop: each rank runs its own session."""
    from vitquant.cli import main

    q = vitquant.quantize(vitquant.load_model("bundled"), "w8a8", "bundled", progress=False)
    vitquant.export(q, tmp_path / "m.onnx")
    done = _torchrun("eval", str(tmp_path / "m.onnx"), "--threads", "1", "--limit", "400", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if "top-1" in line]
    assert len(lines) == 1 and "(400 images" in lines[0]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["eval", str(tmp_path / "m.onnx"), "--threads", "1", "--limit", "400", "--quiet"]) == 0
    assert lines[0].split(" (")[0] == buf.getvalue().strip().split(" (")[0]  # the counts; not the seconds


def test_torchrun_refuses_commands_that_do_not_run_distributed(tmp_path):
    done = _torchrun("list", cwd=tmp_path)
    assert done.returncode != 0
    assert "`vitquant list` does not run distributed" in done.stderr
