"""Saving a quantized model as `model.safetensors` + `quant_config.json`, and loading it back.

The safetensors file holds integer weight codes (uint8/int8) for every quantized layer and float32 for
everything else; the JSON holds the config, how to rebuild the float architecture, and every
quantizer's type, bits, scales and zero points. Loading needs no calibration data and reproduces the
outputs exactly. Directories are written atomically: a temporary sibling is renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vitquant.config import QuantConfig
from vitquant.errors import VitquantError
from vitquant.methods import get_method
from vitquant.models import QuantizedModel, prepare
from vitquant.models.sources import build_from_source
from vitquant.quantizers import UniformQuantizer, quantizer_from_spec

FORMAT = "vitquant-quantized/1"
WEIGHTS, META = "model.safetensors", "quant_config.json"


@contextmanager
def atomic_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` only if the block succeeds."""
    out = Path(out)
    if out.exists() and not force:
        raise VitquantError(f"output directory '{out}' already exists; pass --force (force=True) to replace it")
    if out.exists() and not out.is_dir():
        raise VitquantError(f"output path '{out}' exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any new folder
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _weight_codes(layer) -> torch.Tensor:
    q = layer.weight_quantizer
    if not isinstance(q, UniformQuantizer) or q.bits > 8:
        raise VitquantError(f"layer {layer.name!r}: only uniform ≤8-bit weight quantizers can be saved as codes")
    dtype = torch.int8 if q.symmetric else torch.uint8
    return q.quantize(layer.weight.detach()).to(dtype)


def save(qmodel: QuantizedModel, out: str | Path, force: bool = False, extra: dict[str, Any] | None = None,
         extra_files: dict[str, str | Path] | None = None) -> Path:
    """extra: more JSON facts for quant_config.json; extra_files: {name in out/: file to copy there}."""
    if qmodel.config is None:
        raise VitquantError("only a calibrated model (from vitquant.quantize) can be saved")
    state = {k: v.detach().contiguous() for k, v in qmodel.model.state_dict().items()}
    for name, layer in qmodel.weight_layers().items():
        if layer.weight_enabled:  # a weight the plan keeps float is saved as it is
            state[f"{name}.weight"] = _weight_codes(layer).contiguous()
    meta = {
        "format": FORMAT,
        "config": qmodel.config.to_dict(),
        "structure": qmodel.structure.summary(),
        "source": qmodel.source,
        "quantizers": qmodel.quantizer_specs(),
        "stats": qmodel.stats,
        **(extra or {}),
    }
    with atomic_dir(out, force) as tmp:
        save_file(state, str(tmp / WEIGHTS))
        (tmp / META).write_text(json.dumps(meta, indent=1, default=str))
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
    return Path(out)


def load(path: str | Path, model: nn.Module | None = None) -> QuantizedModel:
    """Load a saved quantized model. `model`: the float architecture, when the saved one cannot be
    rebuilt from its recorded source (a custom nn.Module)."""
    path = Path(path)
    if not (path / META).is_file() or not (path / WEIGHTS).is_file():
        raise VitquantError(f"'{path}' is not a saved vitquant model (needs {WEIGHTS} and {META})")
    meta = json.loads((path / META).read_text())
    if meta.get("format") != FORMAT:
        raise VitquantError(f"'{path / META}' has format {meta.get('format')!r}, expected {FORMAT!r}")
    if model is None:
        if not meta.get("source"):
            raise VitquantError(f"'{path}' does not record how to rebuild its float model; pass model=")
        model = build_from_source(meta["source"])
    config = QuantConfig.from_dict(meta["config"])
    extra_sites = get_method(config.method).requires_sites  # the method's own sites, recreated
    qmodel = prepare(model, source=meta.get("source"), extra_sites=extra_sites, unknown=config.unknown_layers)
    state = load_file(str(path / WEIGHTS))
    specs = meta["quantizers"]
    expected = set(qmodel.act_sites()) | {f"{n}.weight" for n in qmodel.weight_layers()}
    if expected != set(specs):
        diff = sorted(expected ^ set(specs))
        raise VitquantError(f"'{path}' was saved from a model with other quantization sites than this one has now "
                            f"({', '.join(diff[:4])}{' …' if len(diff) > 4 else ''}): a different architecture, or "
                            "a library version whose forward computes differently")
    for name, site in qmodel.act_sites().items():
        spec = specs[name]
        site.enabled = spec["enabled"]
        site.quantizer = quantizer_from_spec(spec["quantizer"]) if spec["quantizer"] else None
        if site.quantizer is not None:
            site.quantizer.name = name
    codes = {}
    for name, layer in qmodel.weight_layers().items():
        spec = specs[f"{name}.weight"]["quantizer"]
        if spec is None:  # kept float by the plan: the state holds the float weight
            layer.weight_enabled, layer.weight_quantizer = False, None
            continue
        layer.weight_quantizer = quantizer_from_spec(spec)
        codes[name] = state.pop(f"{name}.weight")
        if layer.bias is None and f"{name}.bias" in state:  # a reparameterization gave it a bias
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0]))
    missing, unexpected = qmodel.model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not any(k == f"{n}.weight" for n in codes)]
    if missing or unexpected:
        raise VitquantError(f"'{path}' does not fit its model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, layer in qmodel.weight_layers().items():
            if name in codes:
                layer.weight.copy_(layer.weight_quantizer.dequantize(codes[name].float()))
            layer.weight_frozen = True
    qmodel.config = config
    qmodel.stats = meta.get("stats", {})
    return qmodel.eval()
