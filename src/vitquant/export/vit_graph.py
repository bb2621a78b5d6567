"""The ONNX graph of a timm Vision Transformer, float or QDQ, written node by node like its forward.

Written by hand rather than traced so that the graph is the one ONNX Runtime runs fastest and the one
the simulation computes (deployment.md: traced exports of fused attention fail or differ; Q/DQ pairs
around every op eat the int8 gain):
- every Linear/patch-embedding GEMM is `DequantizeLinear(uint8 codes) → MatMul ← DequantizeLinear(int8
  per-channel weight)`, the pattern ONNX Runtime fuses into one integer GEMM (MatMulIntegerToFloat);
- the patch-embedding conv (kernel = stride) is a patchify reshape + GEMM, so it is an int8 GEMM too;
- attention is explicit (Q·Kᵀ, softmax, P·V) as in the simulation's `AttentionSites`; q, k, v are three GEMMs so that
  each is quantized right after its bias, and a per-tensor quantizer is applied *before* the head
  reshape/transposes (quantization commutes with them), which then move uint8 instead of float;
- the 1/√d attention scale is folded into q's dequantization scale (one multiply fewer per score);
- LayerNorm, GELU and softmax are the standard ONNX ops ORT fuses (LayerNorm reparameterization is
  already folded into the weights by the method, so nothing of it is left to export);
- a QwT compensation (`<method>+qwt`, methods/qwt.py) is a float `MatMul(block input, W) + b` added to the
  block's output, as the simulation's hook computes it.
Anything the walker does not know raises a VitquantError naming the layer.
"""
from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto
from torch import nn

from vitquant.errors import VitquantError
from vitquant.export.deployable import (ActQuant, SiteExport, activation_export, describe, exports_exactly,
                                       weight_codes)
from vitquant.export.graph import GraphBuilder
from vitquant.export.isa import Scheme
from vitquant.models.dispatch import handlers_of
from vitquant.models.handlers import AttentionSites, OpSites
from vitquant.models.qmodules import ActSite
from vitquant.quantizers import UniformQuantizer


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _extra_sites(module: nn.Module, which: str) -> list:
    """A module's opt-in op sites (FQ-ViT's residual/embedding sites) on results ("output") or operands
    ("operand"), in call order."""
    found = [(k.rstrip("0123456789"), int("".join(c for c in k if c.isdigit()) or 0), h)
             for k, h in handlers_of(module).items() if isinstance(h, OpSites)]
    sites = [getattr(h, f"{which}_site") for _, _, h in sorted(found, key=lambda t: (t[0], t[1]))]
    return [s for s in sites if s is not None]


def _by_role(sites: list, role: str) -> list:
    return [s for s in sites if s.role == role]


def _core(attn: nn.Module, p: str) -> AttentionSites:
    cores = [h for h in handlers_of(attn).values() if isinstance(h, AttentionSites)]
    if len(cores) != 1:
        raise VitquantError(f"ONNX export: {p} does not compute one scaled-dot-product attention")
    return cores[0]


def _is_identity(m: nn.Module | None) -> bool:
    return m is None or isinstance(m, (nn.Identity, nn.Dropout))


class ViTGraph:
    """Walks a timm VisionTransformer (plain or vitquant-prepared) and emits its ONNX graph.

    quantized=False writes the float graph (the one validated against PyTorch first); probes=True also
    exposes every GEMM's output as a graph output, for the per-layer parity report.
    """

    def __init__(self, model: nn.Module, quantized: bool, scheme: Scheme | None = None,
                 non_uniform: str = "uniform8", probes: bool = False, float_bias: bool = False,
                 compensation: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        self.float_bias = float_bias  # see onnx_qdq.export(bias=...)
        self.compensation = dict(compensation or {})  # block name → QwT (W [C, C], b [C])
        self.m, self.quantized, self.scheme, self.rule, self.probes = model, quantized, scheme, non_uniform, probes
        self.g = GraphBuilder("vitquant_vit")
        self.sites: list[SiteExport] = []
        self.gemms: dict[str, str] = {}  # layer → "int8" | "float (why)"
        self.probe_outputs: dict[str, str] = {}  # layer name → graph output name

    # -- activation sites ---------------------------------------------------------------------------
    def grid(self, site) -> ActQuant | None:
        if not self.quantized or site is None:
            return None
        q = site.quantizer
        if not site.enabled or q is None:
            self.sites.append(SiteExport(site.name, site.role, describe(q), "float (site disabled by the method)"))
            return None
        if getattr(q, "from_scores", False):  # an integer softmax (FQ-ViT's Log-Int-Softmax): no QDQ form
            u = UniformQuantizer(8, name=site.name)
            u.set_range(torch.tensor(0.0), torch.tensor(1.0))
            grid, detail = (None, "float (integer softmax; rule non_uniform='float')") if self.rule == "float" else (
                activation_export(u, self.rule)[0], "uniform8 [0, 1] (float softmax; integer softmax has no QDQ form)")
        else:
            grid, detail = activation_export(q, self.rule)
        self.sites.append(SiteExport(site.name, site.role, describe(q), detail))
        return grid

    def site(self, x: str, module: nn.Module | None, name: str) -> str:
        """Apply an optional ActSite (the adapter's opt-in extra sites: residual stream, branch outputs…)."""
        if not isinstance(module, ActSite):
            return x
        return self.fake(x, self.grid(module), name)

    def quant(self, x: str, grid: ActQuant, name: str, axis: int | None = None) -> str:
        g = self.g
        if grid.offset:  # the stand-in of a quantizer that shifts its input (see deployable.py)
            x = g.op("Add", [x, g.const(grid.offset, np.float32)], f"{name}.shift")
        q = g.quantize(x, grid.scale, grid.zero_point, None if grid.per_tensor else (axis if axis is not None else grid.axis), name)
        if grid.needs_clip:  # a grid narrower than its 8-bit type (fewer bits, or a narrow signed grid)
            dt = grid.zero_point.dtype
            q = g.op("Clip", [q, g.const(grid.qmin, dt), g.const(grid.qmax, dt)], f"{name}.clip")
        return q

    def dequant(self, q: str, grid: ActQuant, name: str, scale_mult: float = 1.0, axis: int | None = None) -> str:
        scale = (grid.scale.astype(np.float64) * scale_mult).astype(np.float32)
        return self.g.dequantize(q, scale, grid.zero_point, None if grid.per_tensor else (axis if axis is not None else grid.axis), name)

    def fake(self, x: str, grid: ActQuant | None, name: str, matmul_rank: int | None = None) -> str:
        """Q → DQ. matmul_rank: x is an operand of a batched activation MatMul of that rank; a per-channel
        grid there is dequantized with Cast/Sub/Mul, because ORT would fuse DequantizeLinear → MatMul into
        a QLinearMatMul whose kernel then rejects per-channel zero points (ORT 1.31)."""
        if grid is None:
            return x
        q = self.quant(x, grid, name)
        if matmul_rank is None or grid.per_tensor:
            return self.dequant(q, grid, name)
        shape = [1] * matmul_rank
        shape[grid.axis] = -1
        g = self.g
        zp = g.initializer(grid.zero_point.astype(np.float32).reshape(shape), f"{name}.zp_f")
        sc = g.initializer(grid.scale.astype(np.float32).reshape(shape), f"{name}.scale_f")
        centered = g.op("Sub", [g.op("Cast", [q], f"{name}.codes", to=TensorProto.FLOAT), zp], f"{name}.centered")
        return g.op("Mul", [centered, sc], f"{name}.dq")

    # -- GEMMs --------------------------------------------------------------------------------------
    def gemm(self, x: str, layer, name: str, x_grid: ActQuant | None, rows: slice | None = None) -> str:
        """[M, K] → [M, N] Gemm. With a per-tensor quantized input (x is its DequantizeLinear) and an
        affine weight quantizer, A and W are DequantizeLinear(int) → Gemm, which ONNX Runtime turns into
        one QGemm (integer GEMM with the rescale fused). The bias is either int32 at scale s_x·s_w, added
        in QGemm's epilogue (fastest; rounding error ≤ s_x·s_w/2, what every integer runtime does), or
        the float bias added after it (float_bias: bit-exact with the simulation, one more pass)."""
        g, rows = self.g, rows or slice(None)
        bias = None if layer.bias is None else _np(layer.bias)[rows]
        wq = getattr(layer, "weight_quantizer", None)
        why = None
        if not self.quantized:
            pass
        elif x_grid is None or not x_grid.per_tensor:
            why = "float input" if x_grid is None else "per-channel input quantizer"
        elif not exports_exactly(wq) or (weight := weight_codes(layer, self.scheme)) is None:
            why = "weight quantizer has no 8-bit affine form"
        else:
            codes, scale, zp = (a[rows] for a in weight)
            inputs = [x, g.dequantize(g.initializer(codes.T, f"{name}.weight_q"), scale, zp, 1, f"{name}.weight")]
            if bias is not None and self.float_bias:
                self.gemms[name] = "int8"
                y = g.op("Gemm", inputs, f"{name}.gemm")
                return g.op("Add", [y, g.initializer(bias.astype(np.float32), f"{name}.bias")], f"{name}.out")
            if bias is not None:
                b_scale = float(x_grid.scale) * scale.astype(np.float64)
                b_q = np.round(bias / b_scale)
                if np.abs(b_q).max() >= 2**31 - 1:
                    why = "bias overflows int32 at the input·weight scale"
                else:
                    inputs.append(g.dequantize(g.initializer(b_q.astype(np.int32), f"{name}.bias_q"),
                                               b_scale.astype(np.float32), np.zeros_like(b_q, np.int32), 0,
                                               f"{name}.bias"))
            if why is None:
                self.gemms[name] = "int8"
                return g.op("Gemm", inputs, f"{name}.gemm")
        if self.quantized:
            self.gemms[name] = f"float ({why})"
        w = _np(layer.weight.reshape(layer.weight.shape[0], -1))[rows].T.astype(np.float32)
        inputs = [x, g.initializer(w, f"{name}.weight")]
        if bias is not None:
            inputs.append(g.initializer(bias.astype(np.float32), f"{name}.bias"))
        return g.op("Gemm", inputs, f"{name}.gemm")

    def linear(self, x: str, layer, name: str) -> str:
        """Input site (Q/DQ) + GEMM."""
        grid = self.grid(getattr(layer, "input_site", None))
        y = self.probe(name, self.gemm(self.fake(x, grid, f"{name}.input"), layer, name, grid))
        return self.site(y, getattr(layer, "output_site", None), f"{name}.output")

    def probe(self, name: str, value: str) -> str:
        if self.probes:
            self.probe_outputs[name] = self.g.add_output(value, f"probe:{name}")
        return value

    # -- float ops ----------------------------------------------------------------------------------
    def norm(self, x: str, norm: nn.Module | None, name: str) -> str:
        if _is_identity(norm):
            return x
        if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
            raise VitquantError(f"ONNX export: {name} is a {type(norm).__name__}; only LayerNorm over the last "
                                "dimension (or Identity) can be exported")
        g, c = self.g, norm.normalized_shape[0]
        w = _np(norm.weight) if norm.weight is not None else np.ones(c)
        b = _np(norm.bias) if norm.bias is not None else np.zeros(c)
        return g.op("LayerNormalization", [x, g.initializer(w.astype(np.float32), f"{name}.weight"),
                                           g.initializer(b.astype(np.float32), f"{name}.bias")],
                    name, axis=-1, epsilon=float(norm.eps))

    def reshape(self, x: str, shape: list[int], name: str) -> str:
        return self.g.op("Reshape", [x, self.g.const(shape)], name)

    def transpose(self, x: str, perm: list[int], name: str) -> str:
        return self.g.op("Transpose", [x], name, perm=perm)

    def layer_scale(self, x: str, ls: nn.Module, name: str) -> str:
        if _is_identity(ls):
            return x
        if not hasattr(ls, "gamma"):
            raise VitquantError(f"ONNX export: {name} ({type(ls).__name__}) is not a LayerScale")
        return self.g.op("Mul", [x, self.g.initializer(_np(ls.gamma).astype(np.float32), f"{name}.gamma")], name)

    # -- the model ----------------------------------------------------------------------------------
    # Tokens travel as a 2-D [B·N, C] matrix: every Linear is then a plain Gemm (ORT's QGemm), and
    # LayerNorm/GELU/residual adds do not care. Only attention reshapes to [B, H, N, d].
    def patch_embed(self, x: str) -> str:
        pe = self.m.patch_embed
        conv = pe.proj
        k, s = tuple(conv.weight.shape[2:]), tuple(conv.stride)  # QuantConv2d keeps no kernel_size
        if k != s or any(conv.padding) or tuple(conv.dilation) != (1, 1) or conv.groups != 1:
            raise VitquantError("ONNX export: patch_embed.proj must be a conv with kernel = stride, no padding, "
                                f"dilation or groups (got kernel {k}, stride {s})")
        if not getattr(pe, "flatten", True) or getattr(pe, "dynamic_img_pad", False):
            raise VitquantError("ONNX export: patch_embed must flatten its output to tokens, without dynamic padding")
        c = conv.weight.shape[1]
        gh, gw = pe.grid_size
        ph, pw = k
        grid = self.grid(getattr(conv, "input_site", None))

        def patchify(t: str) -> str:  # [B, C, H, W] → [B·gh·gw, C·ph·pw], the conv's weight layout
            t = self.reshape(t, [-1, c, gh, ph, gw, pw], "patchify.split")
            return self.reshape(self.transpose(t, [0, 2, 4, 1, 3, 5], "patchify.perm"), [-1, c * ph * pw], "patchify.flat")

        if grid is not None and grid.per_tensor:  # patchify the uint8 codes (4× less data to move)
            t = self.dequant(patchify(self.quant(x, grid, "patch_embed.input")), grid, "patch_embed.input")
        else:
            t = patchify(self.fake(x, grid, "patch_embed.input"))
        y = self.probe("patch_embed.proj", self.gemm(t, conv, "patch_embed.proj", grid))
        y = self.site(y, getattr(conv, "output_site", None), "patch_embed.output")  # FQ-ViT's patch tokens
        y = self.norm(y, getattr(pe, "norm", None), "patch_embed.norm")
        return self.reshape(y, [-1, gh * gw, self.m.embed_dim], "patch_tokens")

    def tokens(self, x: str) -> str:
        """[B, gh·gw, D] patch tokens → [B·N, D] with class/register tokens and position embedding."""
        m, g = self.m, self.g
        dim = m.embed_dim
        # timm's order: class, distillation (DeiT distilled), register tokens
        names = ("cls_token", "dist_token", "reg_token")
        prefix = [t for t in (self.param(n) for n in names) if isinstance(t, torch.Tensor)]
        if prefix:
            batch = g.op("Shape", [x], "batch_dim", start=0, end=1)
            shape = g.op("Concat", [batch, g.const([1, dim])], "prefix_shape", axis=0)
            prefix = [g.op("Expand", [g.initializer(_np(t).astype(np.float32), "prefix_token"), shape], "prefix")
                      for t in prefix]
        sites = _extra_sites(m, "output")  # FQ-ViT's embedding and first residual sites
        pos = self.param("pos_embed")
        pos_site = next(iter(_by_role(_extra_sites(m, "operand"), "pos_embed")), None)
        if pos is not None and pos_site is not None and self.quantized:
            grid = self.grid(pos_site)  # a quantized constant: exact in the graph
            self.sites[-1] = SiteExport(pos_site.name, pos_site.role, describe(pos_site.quantizer),
                                        "exact (a quantized constant in the graph)")
            if grid is not None:
                with torch.no_grad():
                    pos = pos_site.quantizer(pos)
        pos = None if pos is None else g.initializer(_np(pos).astype(np.float32), "pos_embed")
        embed = _by_role(sites, "embed")
        residual = _by_role(sites, "residual")
        if getattr(m, "no_embed_class", False):
            x = x if pos is None else g.op("Add", [x, pos], "pos_add")
            x = g.op("Concat", [*prefix, x], "tokens", axis=1) if prefix else x
            x = self.site(x, embed[0] if embed else None, "embed")
        else:
            x = g.op("Concat", [*prefix, x], "tokens", axis=1) if prefix else x
            x = self.site(x, embed[0] if embed else None, "embed")
            x = x if pos is None else g.op("Add", [x, pos], "pos_add")
            x = self.site(x, residual[0] if residual else None, "residual")
        return self.reshape(x, [-1, dim], "tokens_2d")

    def param(self, name: str) -> torch.Tensor | None:
        return getattr(self.m, name, None)

    def heads(self, y: str, grid: ActQuant | None, norm, n: str, p: str, attn) -> str:
        """q/k/v [B·N, C] → [B, H, N, d] (k: Kᵀ [B, H, d, N]), quantized as the simulation does."""
        g, h, d, ntok = self.g, attn.num_heads, attn.head_dim, self.num_tokens
        perm = [0, 2, 3, 1] if n == "k" else [0, 2, 1, 3]
        scale = attn.scale if n == "q" else 1.0
        if grid is not None and grid.per_tensor and _is_identity(norm):
            # per-tensor quantization commutes with reshape/transpose: quantize first, move 8-bit codes.
            # A uint8 Q right after the Gemm fuses into it (QGemm); ORT's QDQ Gemm fusion refuses an
            # int8 output for a uint8 input, so an int8 Q goes after the (free) reshape instead.
            if grid.zero_point.dtype == np.uint8:
                t = self.reshape(self.quant(y, grid, f"{p}.{n}"), [-1, ntok, h, d], f"{p}.{n}.heads")
            else:
                t = self.quant(self.reshape(y, [-1, ntok, h, d], f"{p}.{n}.heads"), grid, f"{p}.{n}")
            t = self.transpose(t, perm, f"{p}.{n}.perm")
            return self.dequant(t, grid, f"{p}.{n}", scale_mult=scale)  # 1/√d folded into q's scale
        t = self.transpose(self.reshape(y, [-1, ntok, h, d], f"{p}.{n}.heads"), [0, 2, 1, 3], f"{p}.{n}.perm")
        t = self.fake(self.norm(t, norm, f"{p}.{n}_norm"), grid, f"{p}.{n}", matmul_rank=4)  # the simulation's layout
        if n == "k":
            t = self.transpose(t, [0, 1, 3, 2], f"{p}.k.t")
        return g.op("Mul", [t, g.const(scale, np.float32)], f"{p}.q.scaled") if n == "q" else t

    def attention(self, x: str, attn: nn.Module, p: str) -> str:
        g, heads, d = self.g, attn.num_heads, attn.head_dim
        c = getattr(attn, "attn_dim", heads * d)
        if getattr(attn, "gate", None) is not None:
            raise VitquantError(f"ONNX export: {p} is a gated attention, which the exporter does not support")
        core = _core(attn, p) if self.quantized else None
        qkv_grid = self.grid(getattr(attn.qkv, "input_site", None))
        x_in = self.fake(x, qkv_grid, f"{p}.qkv.input")
        parts = {n: self.gemm(x_in, attn.qkv, f"{p}.{n}", qkv_grid, slice(i * c, (i + 1) * c)) for i, n in enumerate("qkv")}
        if self.probes:
            self.probe(f"{p}.qkv", g.op("Concat", list(parts.values()), f"{p}.qkv.cat", axis=-1))
        out = {}
        for n, y in parts.items():
            grid = self.grid(getattr(core, f"{n}_site", None))
            if grid is not None and n in "kv" and self.scheme is not None and self.scheme.weight_dtype == "int8":
                grid = grid.as_int8()  # Kᵀ and V are the B operand: int8 selects the u8s8 kernel
            out[n] = self.heads(y, grid, {"q": attn.q_norm, "k": attn.k_norm}.get(n), n, p, attn)
        scores = g.op("MatMul", [out["q"], out["k"]], f"{p}.scores")
        if getattr(core, "scores_site", None) is not None:
            scores = self.fake(scores, self.grid(core.scores_site), f"{p}.scores_q")
        probs = g.op("Softmax", [scores], f"{p}.softmax", axis=-1)
        probs = self.fake(probs, self.grid(getattr(core, "softmax_site", None)), f"{p}.softmax", matmul_rank=4)
        o = g.op("MatMul", [probs, out["v"]], f"{p}.context")  # [B, H, N, d]
        proj_grid = self.grid(getattr(attn.proj, "input_site", None))
        merge = lambda t: self.reshape(self.transpose(t, [0, 2, 1, 3], f"{p}.merge.perm"), [-1, c], f"{p}.merge")  # noqa: E731
        if proj_grid is not None and proj_grid.per_tensor and _is_identity(attn.norm):
            # quantized right after P·V (ORT: QLinearMatMul with uint8 output), merged as uint8
            t = self.dequant(merge(self.quant(o, proj_grid, f"{p}.proj.input")), proj_grid, f"{p}.proj.input")
        else:
            t = self.fake(self.norm(merge(o), attn.norm, f"{p}.norm"), proj_grid, f"{p}.proj.input")
        y = self.probe(f"{p}.proj", self.gemm(t, attn.proj, f"{p}.proj", proj_grid))
        return self.site(y, getattr(attn.proj, "output_site", None), f"{p}.proj.output")

    def mlp(self, x: str, mlp: nn.Module, p: str) -> str:
        act = mlp.act
        if not isinstance(act, nn.GELU):
            raise VitquantError(f"ONNX export: {p}.act is {type(act).__name__}; only nn.GELU is supported")
        h = self.linear(x, mlp.fc1, f"{p}.fc1")
        h = self.g.op("Gelu", [h], f"{p}.gelu", approximate=act.approximate)
        h = self.norm(h, getattr(mlp, "norm", None), f"{p}.mlp_norm")
        return self.linear(h, mlp.fc2, f"{p}.fc2")

    def block(self, x: str, blk: nn.Module, p: str) -> str:
        residual = _by_role(_extra_sites(blk, "output"), "residual")  # FQ-ViT's residual stream sites
        residual += [None] * (2 - len(residual))
        a = self.attention(self.norm(x, blk.norm1, f"{p}.norm1"), blk.attn, f"{p}.attn")
        x = self.g.op("Add", [x, self.layer_scale(a, blk.ls1, f"{p}.ls1")], f"{p}.res1")
        x = self.site(x, residual[0], f"{p}.attn_residual")
        h = self.mlp(self.norm(x, blk.norm2, f"{p}.norm2"), blk.mlp, f"{p}.mlp")
        x = self.g.op("Add", [x, self.layer_scale(h, blk.ls2, f"{p}.ls2")], f"{p}.res2")
        return self.site(x, residual[1], f"{p}.mlp_residual")

    def compensate(self, x_in: str, y: str, p: str) -> str:
        """y + x_in·W + b for a block with a QwT compensation (float, as the simulation computes it)."""
        if p not in self.compensation:
            return y
        w, b = self.compensation.pop(p)
        g = self.g
        t = g.op("MatMul", [x_in, g.initializer(_np(w).astype(np.float32), f"{p}.qwt.weight")], f"{p}.qwt.matmul")
        t = g.op("Add", [t, g.initializer(_np(b).astype(np.float32), f"{p}.qwt.bias")], f"{p}.qwt.bias_add")
        return g.op("Add", [y, t], f"{p}.qwt")

    def head(self, x: str) -> str:
        m, g = self.m, self.g
        if getattr(m, "attn_pool", None) is not None:
            raise VitquantError("ONNX export: attention pooling (attn_pool) is not supported")
        x = self.reshape(x, [-1, self.num_tokens, m.embed_dim], "tokens_3d")
        token = lambda i: g.op("Gather", [x, g.const(i)], f"token{i}", axis=1)  # noqa: E731
        if isinstance(getattr(m, "head_dist", None), nn.Module):  # DeiT distilled: mean of the two heads
            a = self.linear(token(0), m.head, "head")
            b = self.linear(token(1), m.head_dist, "head_dist")
            return g.op("Mul", [g.op("Add", [a, b], "heads_sum"), g.const(0.5, np.float32)], "heads_mean")
        pool, npt = m.global_pool, m.num_prefix_tokens
        if pool == "token":
            x = token(0)
        elif pool in ("avg", "max", "avgmax"):
            if not getattr(m, "pool_include_prefix", False) and npt:
                x = g.op("Slice", [x, g.const([npt]), g.const([2**62]), g.const([1])], "patch_tokens")
            mean = lambda: g.op("ReduceMean", [x, g.const([1])], "pool_mean", keepdims=0)  # noqa: E731
            mx = lambda: g.op("ReduceMax", [x, g.const([1])], "pool_max", keepdims=0)  # noqa: E731
            x = mean() if pool == "avg" else mx() if pool == "max" else g.op(
                "Mul", [g.op("Add", [mean(), mx()], "pool_sum"), g.const(0.5, np.float32)], "pool_avgmax")
        elif pool:
            raise VitquantError(f"ONNX export: global_pool={pool!r} is not supported (token, avg, max, avgmax)")
        else:
            raise VitquantError("ONNX export: a model without pooling (global_pool='') outputs tokens, "
                                "not logits; set global_pool to 'token' or 'avg'")
        x = self.norm(x, getattr(m, "fc_norm", None), "fc_norm")
        return x if _is_identity(m.head) else self.linear(x, m.head, "head")

    def build(self, producer: str, metadata: dict[str, str] | None = None):
        m, g = self.m, self.g
        c, h, w = m.patch_embed.proj.weight.shape[1], *m.patch_embed.img_size
        self.num_tokens = m.patch_embed.num_patches + m.num_prefix_tokens
        x = g.add_input("input", ["batch", c, h, w])
        x = self.tokens(self.patch_embed(x))
        x = self.norm(x, getattr(m, "norm_pre", None), "norm_pre")
        for i, blk in enumerate(m.blocks):
            x = self.compensate(x, self.block(x, blk, f"blocks.{i}"), f"blocks.{i}")
        if self.compensation:
            raise VitquantError(f"ONNX export: the QwT compensation of {sorted(self.compensation)} is not on a block "
                                "the exporter walks")
        x = self.head(self.norm(x, m.norm, "norm"))
        g.add_output(x, "logits")
        g.outputs.insert(0, g.outputs.pop())  # logits first, then any probes
        if self.quantized:
            self._check_every_site_placed()
        return g.model(producer, metadata)

    def _check_every_site_placed(self) -> None:
        """A quantization point the walker does not know must stop the export, not vanish from it."""
        placed = {s.site for s in self.sites}
        for module in self.m.modules():
            if isinstance(module, ActSite) and module.name not in placed:
                if module.enabled:
                    raise VitquantError(f"ONNX export: activation site {module.name!r} ({module.role}) is not placed "
                                        "by the exporter; this model has a quantization point it does not know")
