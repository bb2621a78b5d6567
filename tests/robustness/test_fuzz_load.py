"""Property-based fuzzing of `vitquant.load` (hypothesis): quant_config.json and model.safetensors with
deleted keys, values of other types, changed shapes and dtypes in the safetensors header, flipped bytes
and truncation.

- As found on disk (checksums left as saved): load either gives outputs identical to the original or
  raises VitquantError — a damaged directory is never loaded as a different model.
- With the checksums recomputed after the edit (a file written by another tool, or edited with care):
  load still raises nothing but VitquantError, and a model it returns runs.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import vitquant
from vitquant.errors import VitquantError
from vitquant.serialization import META, WEIGHTS, meta_digest, sha256_file

FUZZ = settings(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
X = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_vit_factory_module):
    model = tiny_vit_factory_module(depth=1, embed_dim=32)
    model.vitquant_source = {"type": "timm.VisionTransformer", "pretrained_cfg": model.pretrained_cfg,
                             "kwargs": dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32,
                                            depth=1, num_heads=2)}
    qmodel = vitquant.quantize(model, vitquant.QuantConfig(w_bits=4, a_bits=4, calib_size=8), torch.randn(8, 1, 28, 28),
                               progress=False)
    root = vitquant.save(qmodel, tmp_path_factory.mktemp("fuzz") / "q")
    with torch.no_grad():
        reference = qmodel(X)
    meta = json.loads((root / META).read_text())
    return {"root": root, "meta_text": (root / META).read_text(), "weights": (root / WEIGHTS).read_bytes(),
            "reference": reference, "paths": _paths(meta), "signed_paths": [p for p in _paths(meta) if p[0] in
                                                                            ("config", "source", "quantizers")]}


@pytest.fixture(scope="module")
def tiny_vit_factory_module():
    from timm.models.vision_transformer import VisionTransformer

    def make(depth, embed_dim):
        torch.manual_seed(0)
        m = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=embed_dim, depth=depth,
                              num_heads=2).eval()
        m.pretrained_cfg = dict(input_size=(1, 28, 28), mean=(0.1307,), std=(0.3081,), crop_pct=1.0,
                                interpolation="bilinear")
        return m
    return make


def _paths(obj, prefix=()) -> list[tuple]:
    out = [prefix] if prefix else []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        out += _paths(v, (*prefix, k))
    return out


# small numbers only: a recomputed checksum lets an edit reach the model constructor, and a depth of
# 10**9 would test patience, not robustness
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 40) | st.floats(-1e3, 1e3) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=4)
DTYPES = st.sampled_from(["F32", "F16", "U8", "I8", "I64", "BOOL", "XX"])


def _set(meta, path, value=None, delete=False):
    target = meta
    for k in path[:-1]:
        target = target[k]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value


KINDS = st.sampled_from(["json-delete", "json-replace", "json-text", "st-truncate", "st-flip", "st-header"])


def _apply(saved, kind, data, signed_only: bool) -> tuple[str, bytes]:
    text, weights = saved["meta_text"], saved["weights"]
    paths = saved["signed_paths"] if signed_only else saved["paths"]
    if kind in ("json-delete", "json-replace"):
        meta = json.loads(text)
        path = data.draw(st.sampled_from(paths))
        _set(meta, path, data.draw(JSON_VALUES), delete=kind == "json-delete")
        text = json.dumps(meta)
    elif kind == "json-text":
        cut = data.draw(st.integers(0, len(text) - 1))
        text = text[:cut] + data.draw(st.sampled_from(["", "}", "NaN", "Infinity", "\x00", '"', "]"]))
    elif kind == "st-truncate":
        weights = weights[: data.draw(st.integers(0, len(weights) - 1))]
    elif kind == "st-flip":
        pos = data.draw(st.integers(0, len(weights) - 1))
        weights = weights[:pos] + bytes([weights[pos] ^ data.draw(st.integers(1, 255))]) + weights[pos + 1:]
    else:  # rewrite one tensor's dtype, shape or offsets in the safetensors header
        n = struct.unpack("<Q", weights[:8])[0]
        header, body = json.loads(weights[8:8 + n]), weights[8 + n:]
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][field] = data.draw(DTYPES if field == "dtype" else st.lists(st.integers(0, 5000), max_size=3))
        raw = json.dumps(header).encode()
        weights = struct.pack("<Q", len(raw)) + raw + body
    return text, weights


def _write(root: Path, text: str, weights: bytes, rehash: bool) -> None:
    (root / WEIGHTS).write_bytes(weights)
    if rehash:
        meta = json.loads(text)
        if isinstance(meta, dict):
            meta["integrity"] = {"model.safetensors_sha256": sha256_file(root / WEIGHTS),
                                 "meta_sha256": meta_digest(meta)}
            text = json.dumps(meta)
    (root / META).write_text(text)


@settings(FUZZ, max_examples=500)
@given(kind=KINDS, data=st.data())
def test_a_damaged_directory_loads_identically_or_is_refused(saved, kind, data):
    text, weights = _apply(saved, kind, data, signed_only=False)
    _write(saved["root"], text, weights, rehash=False)
    try:
        loaded = vitquant.load(saved["root"])
    except VitquantError:
        event(f"{kind}: refused")
        return
    event(f"{kind}: loaded")
    with torch.no_grad():
        assert torch.equal(loaded(X), saved["reference"]), f"{kind} loaded as a different model"


@settings(FUZZ, max_examples=250)
@given(kind=KINDS, data=st.data())
def test_an_edited_directory_with_valid_checksums_raises_only_vitquant_errors(saved, kind, data):
    text, weights = _apply(saved, kind, data, signed_only=True)
    try:
        json.loads(text)
    except ValueError:
        return  # unparseable JSON cannot be re-checksummed; the first test covers it
    _write(saved["root"], text, weights, rehash=True)
    try:
        loaded = vitquant.load(saved["root"])
    except VitquantError as e:
        event(f"{kind}: refused ({str(e).split(': ')[1][:40] if ': ' in str(e) else e})")
        return
    event(f"{kind}: loaded")
    with torch.no_grad():
        assert loaded(X).shape == (3, 10)
