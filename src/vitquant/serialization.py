"""Saving a quantized model as `model.safetensors` + `quant_config.json`, loading it back, and the rules
every output directory vitquant writes follows.

- save: integer weight codes (uint8/int8) for every quantized layer, float32 for everything else; the
  JSON holds the config, how to rebuild the float architecture, every quantizer's type, bits, scales and
  zero points, SHA-256 checksums of both, and where the float checkpoint was (path + content hash, so a
  moved or changed checkpoint is recognised). A human-readable `report.md` is written beside them.
  A `<method>+qwt` model also carries its per-unit compensation: float32 tensors `qwt/<unit>/weight|bias`
  and a signed "qwt" entry (units, each unit's input position in its call, the fit's record).
- load: needs no calibration data and reproduces the outputs exactly; a damaged or edited directory is
  refused with a VitquantError naming the file and the fix (checksums first, then every field and tensor
  is checked against the rebuilt model, then one forward pass).
- outputs: written atomically (a temporary sibling renamed into place) and marked with a
  `.vitquant-output` file listing what was written; `--force` replaces only a directory that carries the
  marker and holds nothing else (or an empty one), so it can never delete a user's own files.
- JSON is strict everywhere (no NaN/Infinity tokens).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from vitquant.config import QuantConfig, strict_json_loads
from vitquant.errors import VitquantError

FORMAT = "vitquant-quantized/2"
LEGACY_FORMAT = "vitquant-quantized/1"  # no checksums: readable, but damage cannot be detected
WEIGHTS, META, REPORT, MARKER = "model.safetensors", "quant_config.json", "report.md", ".vitquant-output"
_LEGACY_FILES = {WEIGHTS, META, "calibration_images.png"}  # what a /1 directory held: safe to replace
_SIGNED = ("format", "config", "source", "quantizers", "float_weights", "qwt")  # what decides the outputs
QWT_PREFIX = "qwt/"  # tensors of a QwT compensation (methods/qwt.py): qwt/<unit>/weight, qwt/<unit>/bias


# -- output directories ---------------------------------------------------------------------------
def _not_replaceable(out: Path) -> str | None:
    """Why `out` (an existing directory) must not be replaced, or None when it is vitquant's own output."""
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return None
    if MARKER in entries:
        try:
            written = set(strict_json_loads((out / MARKER).read_text(encoding="utf-8"))["files"])
        except (OSError, ValueError, KeyError, TypeError):
            return f"its {MARKER} marker is unreadable"
        extra = [e for e in entries if e not in written | {MARKER}]
        return f"it holds files vitquant did not write ({', '.join(extra[:5])})" if extra else None
    if META in entries and set(entries) <= _LEGACY_FILES:
        try:
            if strict_json_loads((out / META).read_text(encoding="utf-8")).get("format") == LEGACY_FORMAT:
                return None
        except (OSError, ValueError, AttributeError):
            pass
    return f"it was not written by vitquant (no {MARKER} marker)"


def check_writable(directory: Path, what: str) -> None:
    """Prove `directory` (or the nearest existing folder above it) accepts new entries by making one."""
    probe_in = directory
    while not probe_in.exists() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".vitquant-probe-", dir=probe_in))
    except OSError as e:
        raise VitquantError(f"cannot write {what}: '{probe_in}' does not accept new files ({e.strerror}); "
                            "choose a writable location or fix its permissions") from None


def check_output_dir(out: str | Path, force: bool = False) -> Path:
    """Everything that would stop `out` from being written, checked before any work: it exists without
    force, it is not vitquant's to replace, or its parent is not writable."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not force:
            raise VitquantError(f"output directory '{out}' already exists; pass --force (force=True) to replace it "
                                "(only a directory vitquant wrote is ever replaced)")
        if out.is_symlink() or not out.is_dir():
            raise VitquantError(f"output path '{out}' exists and is not a directory; --force only replaces a "
                                "directory vitquant wrote: choose another output path")
        why = _not_replaceable(out)
        if why:
            raise VitquantError(f"--force refuses to replace '{out}': {why}; move those files away or choose "
                                "another output directory")
    check_writable(out.parent, f"the output directory '{out}'")
    return out


@contextmanager
def atomic_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` (with its marker) only if the block succeeds."""
    out = check_output_dir(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise VitquantError(f"cannot create the output directory '{out}': {e.strerror}") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any new folder
    try:
        yield tmp
        marker = {"written_by": "vitquant", "files": sorted(p.name for p in tmp.iterdir())}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
        if out.exists():
            check_output_dir(out, force)  # again: the user may have put files there while we worked
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except OSError as e:
        raise VitquantError(f"could not write the output directory '{out}': {e.strerror or e}"
                            f"{f' ({e.filename})' if e.filename else ''}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


MARKDOWN_MARKER = "<!-- written by vitquant; the next run replaces this file -->"


def is_vitquant_markdown(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().strip() == MARKDOWN_MARKER
    except (OSError, UnicodeDecodeError):
        return False


def check_output_file(path: str | Path, force: bool, is_ours, what: str) -> Path:
    """The single-file counterpart of check_output_dir: `force` replaces only a file `is_ours` accepts."""
    path = Path(path)
    if path.is_dir():
        raise VitquantError(f"{what} '{path}' is a directory; pass a file path")
    if path.exists() or path.is_symlink():
        if not force:
            raise VitquantError(f"{what} '{path}' already exists; pass --force to replace it")
        if path.is_symlink() or not is_ours(path):
            raise VitquantError(f"refusing to replace '{path}': it was not written by vitquant; move it away or "
                                f"choose another path for the {what}")
    check_writable(path.parent, f"the {what} '{path}'")
    return path


def write_output_text(path: str | Path, text: str) -> None:
    """Write a vitquant markdown file atomically, with the marker that lets the next run replace it."""
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{MARKDOWN_MARKER}\n{text}")
        os.replace(tmp, path)
    except OSError as e:
        raise VitquantError(f"could not write '{path}': {e.strerror or e}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


# -- checksums and strict JSON ------------------------------------------------------------------------
def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def meta_digest(meta: dict[str, Any]) -> str:
    signed = {k: meta[k] for k in _SIGNED if k in meta}
    text = json.dumps(signed, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _first_nonfinite(obj: Any, where: str = "") -> str | None:
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "(top level)"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        found = _first_nonfinite(v, f"{where}.{k}" if where else str(k))
        if found:
            return found
    return None


def strict_json_dumps(obj: Any, what: str) -> str:
    """JSON text without NaN/Infinity tokens; a non-finite number is an error naming where it is."""
    try:
        return json.dumps(obj, indent=1, default=str, allow_nan=False)
    except ValueError:
        raise VitquantError(f"{what} holds a non-finite number at {_first_nonfinite(obj)} (the model's weights or "
                            "calibration produced NaN/Inf); it cannot be saved — fix the input model") from None


def _float_weights(source: dict | None) -> dict[str, Any] | None:
    """Where the float weights came from: absolute path, and the content hash of a checkpoint file, so the
    float reference of a saved model is found (and checked) from any directory."""
    weights = (source or {}).get("weights")
    if not weights or source.get("name") == "bundled":
        return None
    path = Path(weights)
    if path.is_file():
        return {"path": str(path.resolve()), "sha256": sha256_file(path), "bytes": path.stat().st_size}
    if path.is_dir():
        return {"path": str(path.resolve())}
    return None  # a hub id: nothing local to record


# -- save ---------------------------------------------------------------------------------------------
def _weight_codes(layer) -> torch.Tensor:
    from vitquant.quantizers import UniformQuantizer

    q = layer.weight_quantizer
    if not isinstance(q, UniformQuantizer) or q.bits > 8:
        raise VitquantError(f"layer {layer.name!r}: only uniform ≤8-bit weight quantizers can be saved as codes")
    dtype = torch.int8 if q.symmetric else torch.uint8
    return q.quantize(layer.weight.detach()).to(dtype)


def save(qmodel, out: str | Path, force: bool = False, extra: dict[str, Any] | None = None,
         extra_files: dict[str, str | Path] | None = None) -> Path:
    """extra: more JSON facts for quant_config.json; extra_files: {name in out/: file to copy there}.
    `force` replaces only an output vitquant wrote (see check_output_dir)."""
    from safetensors.torch import save_file

    from vitquant.methods.qwt import compensation_of
    from vitquant.report.output import render_output_report

    if getattr(qmodel, "config", None) is None:
        raise VitquantError("only a calibrated model (from vitquant.quantize) can be saved")
    check_output_dir(out, force)  # before the codes are computed
    # CPU copies: a model quantized on a GPU is saved as the same file (loading gives a CPU model)
    state = {k: v.detach().cpu().contiguous() for k, v in qmodel.model.state_dict().items()}
    for name, layer in qmodel.weight_layers().items():
        if layer.weight_enabled:  # a weight the plan keeps float is saved as it is
            state[f"{name}.weight"] = _weight_codes(layer).cpu().contiguous()
    comp = compensation_of(qmodel)
    if comp is not None:
        state.update(comp.tensors())
    extra = {k: v for k, v in (extra or {}).items() if k not in (*_SIGNED, "integrity")}
    meta = {"format": FORMAT, "config": qmodel.config.to_dict(), "structure": qmodel.structure.summary(),
            "source": qmodel.source, "quantizers": qmodel.quantizer_specs(), "stats": qmodel.stats,
            "float_weights": _float_weights(qmodel.source), **({"qwt": comp.meta()} if comp is not None else {}),
            **extra}
    meta = json.loads(strict_json_dumps(meta, f"the quantization record of '{out}'"))  # what load will see
    float_bytes = sum(p.numel() * 4 for p in qmodel.model.parameters())
    with atomic_dir(out, force) as tmp:
        save_file(state, str(tmp / WEIGHTS))
        meta["integrity"] = {"model.safetensors_sha256": sha256_file(tmp / WEIGHTS), "meta_sha256": meta_digest(meta)}
        (tmp / META).write_text(strict_json_dumps(meta, META) + "\n", encoding="utf-8")
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
        sizes = {"float_fp32_bytes": float_bytes, "deployed_bytes": qmodel.size_bytes(),
                 "file_bytes": (tmp / WEIGHTS).stat().st_size}
        (tmp / REPORT).write_text(render_output_report(meta, sizes, sorted([*os.listdir(tmp), REPORT])),
                                  encoding="utf-8")
    return Path(out)


# -- load ---------------------------------------------------------------------------------------------
def read_meta(path: str | Path) -> dict[str, Any]:
    """The parsed quant_config.json of a saved directory (strict JSON, a known format), checksums verified."""
    path = Path(path)
    if not (path / META).is_file() or not (path / WEIGHTS).is_file():
        raise VitquantError(f"'{path}' is not a saved vitquant model (needs {WEIGHTS} and {META})")
    try:
        meta = strict_json_loads((path / META).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise VitquantError(f"'{path / META}' is not valid JSON ({str(e).splitlines()[0]}): the file is truncated "
                            "or damaged; save or quantize the model again") from None
    if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, LEGACY_FORMAT):
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise VitquantError(f"'{path / META}' has format {found!r}, expected {FORMAT!r}; it was not written "
                            "by this vitquant")
    if meta["format"] == FORMAT:
        sums = meta.get("integrity")
        if not isinstance(sums, dict) or not all(isinstance(sums.get(k), str) for k in
                                                 ("model.safetensors_sha256", "meta_sha256")):
            raise VitquantError(f"'{path / META}' lost its integrity checksums; the directory was edited or damaged: "
                                "save or quantize the model again")
        if sums["meta_sha256"] != meta_digest(meta):
            raise VitquantError(f"'{path / META}' does not match its checksum: it was edited or damaged after "
                                "saving; save or quantize the model again")
        if sums["model.safetensors_sha256"] != sha256_file(path / WEIGHTS):
            raise VitquantError(f"'{path / WEIGHTS}' does not match its checksum in {META}: it is truncated, "
                                "damaged or was replaced; save or quantize the model again")
    return meta


def _damaged(path: Path, what: str) -> VitquantError:
    return VitquantError(f"'{path}' cannot be loaded: {what}; the directory is damaged or was written by another "
                         "vitquant version: save or quantize the model again")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _rebuild(path: Path, meta: dict[str, Any], model: nn.Module | None, config: QuantConfig):
    from vitquant.methods import get_method
    from vitquant.models import prepare
    from vitquant.models.sources import build_from_source

    source = meta.get("source")
    if source is not None and not isinstance(source, dict):
        raise _damaged(path, f"its recorded model source is a {type(source).__name__}, not an object")
    if model is None:
        if not source:
            raise VitquantError(f"'{path}' does not record how to rebuild its float model; pass model=")
        kwargs = source.get("kwargs") or {}
        # vitquant never records arguments for a user's factory, nor ones that make a constructor read
        # files or the network: honouring them would let a record choose what runs or is read
        if (source.get("type") == "python" and kwargs) or (isinstance(kwargs, dict) and {
                "checkpoint_path", "pretrained", "pretrained_cfg_overlay", "cache_dir"} & set(kwargs)):
            raise _damaged(path, "its model source carries arguments vitquant never writes")
    try:
        model = build_from_source(source) if model is None else model
        return prepare(model, source=source, extra_sites=get_method(config.method).requires_sites,
                       unknown=config.unknown_layers)
    except VitquantError:
        raise
    except Exception as e:  # noqa: BLE001 - recorded facts reach third-party constructors (timm, transformers)
        raise _damaged(path, f"its recorded model cannot be rebuilt ({_first_line(e)})") from None


def _quantizer(path: Path, name: str, spec: Any):
    from vitquant.quantizers import quantizer_from_spec

    if spec is None:
        return None
    try:
        q = quantizer_from_spec(spec)
    except Exception as e:  # noqa: BLE001 - each quantizer's from_spec reads its own fields
        raise _damaged(path, f"the quantizer of {name!r} is invalid ({_first_line(e)})") from None
    q.name = name
    return q


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _damaged(path / WEIGHTS, f"it is not a readable safetensors file ({_first_line(e)})") from None


def _restore_weights(path: Path, qmodel, specs: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    from vitquant.quantizers import UniformQuantizer

    codes = {}
    for name, layer in qmodel.weight_layers().items():
        q = _quantizer(path, f"{name}.weight", specs[f"{name}.weight"].get("quantizer"))
        if q is None:  # kept float by the plan: the state holds the float weight
            layer.weight_enabled, layer.weight_quantizer = False, None
            continue
        code = state.pop(f"{name}.weight", None)
        dtype = torch.int8 if getattr(q, "symmetric", False) else torch.uint8
        if not isinstance(q, UniformQuantizer) or q.bits > 8 or code is None or code.dtype != dtype \
                or code.shape != layer.weight.shape:
            raise _damaged(path, f"the weight codes of {name!r} do not fit its layer and quantizer")
        layer.weight_quantizer, codes[name] = q, code
        if layer.bias is None and f"{name}.bias" in state:  # a reparameterization gave it a bias
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], device=layer.weight.device))
    own = qmodel.model.state_dict()
    missing = sorted(k for k in own if k not in state and not (k.endswith(".weight") and k[:-7] in codes))
    unexpected = sorted(k for k in state if k not in own)
    wrong = sorted(k for k in state if k in own and (state[k].shape != own[k].shape
                                                     or state[k].is_floating_point() != own[k].is_floating_point()))
    if missing or unexpected or wrong:
        raise _damaged(path, f"its tensors do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]}, "
                             f"wrong shape or type {wrong[:5]})")
    qmodel.model.load_state_dict(state, strict=False)
    with torch.no_grad():
        for name, layer in qmodel.weight_layers().items():
            if name in codes:
                try:
                    layer.weight.copy_(layer.weight_quantizer.dequantize(codes[name].float()))
                except (RuntimeError, ValueError, TypeError, IndexError) as e:
                    raise _damaged(path, f"the quantizer of '{name}.weight' does not fit its weight "
                                         f"({_first_line(e)})") from None
            layer.weight_frozen = True


def _restore_compensation(path: Path, qmodel, meta: dict[str, Any], config: QuantConfig,
                          state: dict[str, torch.Tensor]) -> None:
    """Take the QwT tensors out of `state` and install them as recorded (methods/qwt.py)."""
    from vitquant.methods.qwt import QwTCompensation

    tensors = {k: state.pop(k) for k in [k for k in state if k.startswith(QWT_PREFIX)]}
    record = meta.get("qwt")
    if record is None and not tensors and not config.method.endswith("+qwt"):
        return
    if not config.method.endswith("+qwt") or not isinstance(record, dict):
        raise _damaged(path, f"method {config.method!r} and its QwT compensation record do not go together")
    units, leaves = record.get("units"), record.get("input_leaves")
    names = {u.name for u in qmodel.structure.units}
    if not isinstance(units, list) or not isinstance(leaves, list) or len(units) != len(leaves) or not all(
            isinstance(u, str) and u in names for u in units) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in leaves):
        raise _damaged(path, "its QwT record does not name units of this model")
    comp = QwTCompensation()
    for unit, leaf in zip(units, leaves):
        w, b = tensors.pop(f"{QWT_PREFIX}{unit}/weight", None), tensors.pop(f"{QWT_PREFIX}{unit}/bias", None)
        if w is None or b is None or w.dim() != 2 or w.shape[0] != w.shape[1] or b.shape != w.shape[1:] \
                or w.dtype != torch.float32 or b.dtype != torch.float32:
            raise _damaged(path, f"the QwT compensation of {unit!r} is missing or not a float32 [C, C] and [C] pair")
        comp.add(unit, leaf, w, b)
    if tensors:
        raise _damaged(path, f"it holds QwT tensors of no recorded unit ({sorted(tensors)[:3]})")
    comp.record = record.get("record") if isinstance(record.get("record"), dict) else {}
    comp.ridge, comp.seconds = record.get("ridge"), record.get("seconds")
    comp.stand_ins = list(record.get("deployable_stand_ins") or [])
    comp.install(qmodel)


def load(path: str | Path, model: nn.Module | None = None):
    """Load a saved quantized model, on the CPU (`.to(device)` moves all of it) or, given `model` (the float
    architecture, when the saved one cannot be rebuilt from its recorded source: a custom nn.Module), on
    that model's device."""
    from vitquant.calibration.engine import model_device
    from vitquant.methods.steps import place_quantizers

    path = Path(path)
    meta = read_meta(path)
    if not isinstance(meta.get("config"), dict):
        raise _damaged(path / META, "it has no 'config' object")
    try:
        config = QuantConfig.from_dict(meta["config"])
    except VitquantError as e:
        raise _damaged(path / META, f"its config is invalid ({e})") from None
    specs = meta.get("quantizers")
    if not isinstance(specs, dict) or not all(isinstance(v, dict) for v in specs.values()):
        raise _damaged(path / META, "its 'quantizers' entry is not an object of per-site objects")
    qmodel = _rebuild(path, meta, model, config)
    expected = set(qmodel.act_sites()) | {f"{n}.weight" for n in qmodel.weight_layers()}
    if expected != set(specs):
        diff = sorted(expected ^ set(specs))
        raise VitquantError(f"'{path}' was saved from a model with other quantization sites than this one has now "
                            f"({', '.join(diff[:4])}{' …' if len(diff) > 4 else ''}): a damaged {META}, a different "
                            "architecture, or a library version whose forward computes differently")
    for name, site in qmodel.act_sites().items():
        enabled = specs[name].get("enabled")
        site.quantizer = _quantizer(path, name, specs[name].get("quantizer"))
        if not isinstance(enabled, bool) or (enabled and site.quantizer is None):
            raise _damaged(path / META, f"site {name!r} has no valid 'enabled' flag and quantizer")
        site.enabled = enabled
    state = _read_state(path)
    _restore_compensation(path, qmodel, meta, config, state)
    _restore_weights(path, qmodel, specs, state)
    place_quantizers(qmodel)
    qmodel.to(model_device(qmodel.model))  # a compensation's tensors where the model is
    qmodel.config = config
    qmodel.stats = meta["stats"] if isinstance(meta.get("stats"), dict) else {}
    qmodel.eval()
    shape = tuple(qmodel.structure.input_shape or ())
    if shape:  # one forward proves every restored quantizer fits the tensor it sees
        try:
            with torch.no_grad():
                qmodel(torch.zeros(1, *shape, device=model_device(qmodel)))
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            raise _damaged(path, f"its quantizers do not fit the model ({_first_line(e)})") from None
    return qmodel
