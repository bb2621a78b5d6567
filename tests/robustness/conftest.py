"""Fixtures for the robustness tests: a tiny model file, image folders, a saved quantized directory and
an exported .onnx (built once per module, copied per test), an unwritable directory, and a CLI runner
that returns (exit code, stdout, stderr lines)."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from badinput import write_images, write_model_file  # noqa: E402

@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    import vitquant

    root = tmp_path_factory.mktemp("pristine")
    model_path = write_model_file(root / "tiny.safetensors")
    write_images(root / "calib", 10)
    write_images(root / "val", 9, classes=["a", "b", "c"])
    model = vitquant.load_model(str(model_path))
    config = vitquant.QuantConfig(method="minmax", deployable=True, calib_size=8)
    qmodel = vitquant.quantize(model, config, torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0)),
                               progress=False)
    vitquant.save(qmodel, root / "q")
    vitquant.export(qmodel, root / "q.onnx")
    return root


@pytest.fixture
def ws(pristine, tmp_path) -> Path:
    """A fresh copy of the pristine workspace (the saved directory records the pristine model file)."""
    return Path(shutil.copytree(pristine, tmp_path / "ws", symlinks=True))


def _accepts_new_entries(folder: Path) -> bool:
    try:
        os.rmdir(tempfile.mkdtemp(dir=folder))
        return True
    except OSError:
        return False


@pytest.fixture
def unwritable_dir(tmp_path) -> Path:
    """A directory in which nothing can be created: chmod 555, or for root (who ignores modes) /sys."""
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        found = next((c for c in (ro, Path("/sys")) if c.is_dir() and not _accepts_new_entries(c)), None)
        if found is None:
            pytest.skip("no unwritable directory available on this machine")
        yield found
    finally:
        ro.chmod(0o755)


@pytest.fixture
def run_cli(capsys):
    from vitquant.cli import main

    def run(argv: list[str]) -> tuple[int, str, list[str]]:
        capsys.readouterr()
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # argparse usage errors exit from parse_args
            rc = e.code
        captured = capsys.readouterr()
        return rc, captured.out, [line for line in captured.err.splitlines() if line.strip()]

    return run
