"""The second trace, read: roles of every site, attention cores, units, heads, scale-mapping candidates.

Units: the modules sequential and reconstruction methods run as a whole. From the root down, a module
that holds exactly one attention core and is called once with a tensor result is a unit (a transformer
block, whatever its class); a module with no core contributes each of its weight layers as a unit (patch
embedding, downsampling, head); anything holding several cores is split into its children.

Mapping candidates: a norm whose output (through channel-preserving ops only) is read by nothing but
Linear inputs (or 1×1 convs), called once, with a per-channel weight and bias. mappings.py then
checks each one is function-preserving on this very model.
"""
from __future__ import annotations

from collections import Counter, defaultdict

from torch import nn

from vitquant.models import roles
from vitquant.models.handlers import AttentionSites, MatmulSites, OpSites
from vitquant.models.qmodules import ActSite, QuantConv2d, QuantLinear
from vitquant.models.structure import Core, ScaleMapping, SiteInfo, Structure, Unit
from vitquant.models.dispatch import HANDLERS


def _owner_key(path: str) -> tuple[str, str]:
    head, _, key = path.rpartition(".")
    owner = head[: -len(HANDLERS)].rstrip(".") if head.endswith(HANDLERS) else head
    return owner, key


def structure_from_trace(model: nn.Module, rec, meta: dict, layers: dict, disc, input_shape, extras) -> Structure:
    first: dict[str, int] = {}
    for mc in rec.modules:
        first.setdefault(mc.path, mc.order)
    calls = Counter(mc.path for mc in rec.modules)
    s = Structure(input_shape=tuple(input_shape), extra_sites=tuple(extras), float_ops=list(disc.float_ops),
                  float_norm_inputs=list(disc.float_norm_inputs))
    if disc.unknown:
        s.float_ops += [f"{u} — left float (unknown='float')" for u in disc.unknown]
    for path in sorted(layers, key=lambda p: first.get(p, 1 << 30)):
        p = rec.layer_in.get(path)
        if p is None:
            s.float_ops.append(f"{path}: not called by the forward — left float")
        elif not p.act:
            s.float_ops.append(f"{path}: computes from constants only (a parameter table) — left float")
        else:
            s.layers.append(path)
    active = set(s.layers)
    s.heads = tuple(h for h in (rec.output.heads if rec.output else ()) if h in active)
    infos: dict[str, SiteInfo] = {}

    def add(site: ActSite, role: str, consumer: str, layer=None, core=None) -> None:
        prov = rec.site_prov.get(site.name)
        if prov is None:
            return
        ndim = rec.site_ndim.get(site.name, 0)
        if consumer.startswith("matmul") or site.role in (roles.QK, roles.V, roles.POST_SOFTMAX, roles.ATTN_SCORES):
            site.channel_axis = 1 if ndim == 4 else -1
        site.role = role
        src = prov.src
        if src is not None and f".{HANDLERS}." in f".{src}":  # computed inside a handler: its owner did it
            src = _owner_key(src)[0]
        infos[site.name] = SiteInfo(site.name, role, consumer, prov.kind, src, layer, core,
                                    heads_axis=1 if ndim == 4 and core is not None else None)

    for path in s.layers:
        layer = layers[path]
        prov = rec.site_prov.get(layer.input_site.name)
        add(layer.input_site, roles.role_of_input(prov.kind if prov else "other", path in s.heads), "layer", path)
        if layer.output_site is not None:
            add(layer.output_site, disc.twin_outputs.get(path, roles.OTHER), "output", path)
    cores: dict[str, dict] = {}
    for path, m in model.named_modules():
        if not isinstance(m, (AttentionSites, MatmulSites, OpSites)):
            continue
        owner, key = _owner_key(path)
        info = meta.get(f"{owner}:{key}", {})
        if isinstance(m, AttentionSites):
            for site, role in ((m.q_site, roles.QK), (m.k_site, roles.QK), (m.v_site, roles.V),
                               (m.softmax_site, roles.POST_SOFTMAX), (m.scores_site, roles.ATTN_SCORES)):
                if site is not None:
                    add(site, role, "matmul", core=m.name)
            cores[m.name] = dict(owner=owner, q=m.q_site.name, k=m.k_site.name, v=m.v_site.name,
                                 softmax=m.softmax_site.name, scores=m.scores_site.name if m.scores_site else None,
                                 handlers=(path,), fused=True)
        elif isinstance(m, MatmulSites) and info.get("kind") in ("qk", "pv"):
            core = cores.setdefault(info["core"], dict(owner=owner, scores=None, handlers=(), fused=False))
            core["handlers"] += (path,)
            if info["kind"] == "qk":
                add(m.a_site, roles.QK, "matmul_a", core=info["core"])
                add(m.b_site, roles.QK, "matmul_b", core=info["core"])
                core.update(q=m.a_site.name, k=m.b_site.name)
            else:
                prob = getattr(rec.site_prov.get(m.a_site.name), "prob", False)
                add(m.a_site, roles.POST_SOFTMAX if prob else roles.ATTN_WEIGHTS, "matmul_a", core=info["core"])
                add(m.b_site, roles.V, "matmul_b", core=info["core"])
                core.update(softmax=m.a_site.name, v=m.b_site.name)
        elif isinstance(m, MatmulSites):
            add(m.a_site, roles.MATMUL, "matmul_a")
            add(m.b_site, roles.MATMUL, "matmul_b")
        else:
            if m.operand_site is not None:
                add(m.operand_site, m.operand_site.role, "operand")
            if m.output_site is not None:
                add(m.output_site, m.output_site.role, "output")
    site_order = {mc.path: mc.order for mc in reversed(rec.modules)}
    by_name = {m.name: p for p, m in model.named_modules() if isinstance(m, ActSite)}
    s.sites = dict(sorted(infos.items(), key=lambda kv: site_order.get(by_name.get(kv[0], ""), 1 << 30)))
    for c in cores.values():
        shape = rec.site_shape.get(c.get("q", ""), ())
        c["heads"] = int(shape[1]) if len(shape) == 4 else 1
    s.cores = [Core(name, **c) for name, c in sorted(cores.items(), key=lambda kv: min(
        first.get(h, 1 << 30) for h in kv[1]["handlers"])) if "q" in c and "v" in c]
    image = [l for l in s.layers if s.sites.get(f"{l}.input") and s.sites[f"{l}.input"].role == roles.IMAGE]
    shape = rec.layer_out_shape.get(image[0], ()) if image else ()
    if len(shape) == 4:
        s.patch_tokens = int(shape[2] * shape[3])
    elif len(shape) == 3:
        s.patch_tokens = int(shape[1])
    _fused_qkv(s, rec, layers)
    s.units = _units(model, s, rec, calls, first)
    s.mappings, s.rejected_mappings = _mapping_candidates(model, s, rec, layers, first)
    return s


def _fused_qkv(s: Structure, rec, layers: dict) -> None:
    for core in s.cores:
        srcs = {getattr(rec.site_prov.get(n), "src", None) if getattr(rec.site_prov.get(n), "kind", "") == "linear"
                else None for n in (core.q, core.k, core.v)}
        if len(srcs) == 1 and None not in srcs:
            (src,) = srcs
            if src in layers and isinstance(layers[src], QuantLinear) and layers[src].out_features % 3 == 0:
                s.fused_qkv[src] = 3


def _units(model: nn.Module, s: Structure, rec, calls: Counter, first: dict) -> list[Unit]:
    children: dict[str, list[str]] = defaultdict(list)
    for path, _ in model.named_modules():
        if path:
            children[path.rpartition(".")[0]].append(path)
    owners = [c.owner for c in s.cores]
    last_call = {}
    for mc in rec.modules:
        last_call[mc.path] = mc

    def inside(p: str, q: str) -> bool:
        return p == "" or q == p or q.startswith(p + ".")

    def replayable(p: str) -> bool:
        mc = last_call.get(p)
        return calls.get(p, 0) == 1 and mc is not None and mc.out_is_tensor and bool(mc.in_ids)

    names: list[str] = []

    def visit(p: str) -> None:
        ls = [l for l in s.layers if inside(p, l)]
        if not ls:
            return
        n_cores = sum(inside(p, o) for o in owners)
        if p and n_cores == 1 and replayable(p):
            names.append(p)
        elif p and n_cores == 0:
            names.extend(ls)
        else:
            for child in children[p]:
                visit(child)

    visit("")
    names.sort(key=lambda n: first.get(n, 1 << 30))
    units, prev = [], None
    for name in names:
        mc = last_call.get(name)
        module = model.get_submodule(name) if name else model
        # chained: called like the previous unit (same class, same tensor arguments) with its output as input,
        # so the previous unit's call with that output swapped in is this unit's call
        chained = bool(mc and prev is not None and mc.in_ids and mc.in_ids[0] == prev[0]
                       and type(module) is prev[1] and mc.signature == prev[2])
        layers = tuple(l for l in s.layers if inside(name, l))
        units.append(Unit(name, layers, tuple(c.name for c in s.cores if inside(name, c.owner)), chained))
        prev = (mc.out_ids[0], type(module), mc.signature) if mc and mc.out_ids else None
    return units


def _mapping_candidates(model: nn.Module, s: Structure, rec, layers: dict, first: dict):
    mappings, rejected = [], {}
    active = set(s.layers)
    for norm in sorted(rec.norm_uses, key=lambda n: first.get(n, 1 << 30)):
        uses = rec.norm_uses[norm]
        bad = [u[1:] for u in uses if u.startswith("!")]
        consumers = tuple(dict.fromkeys(u for u in uses if not u.startswith("!")))
        module = model.get_submodule(norm) if norm else model
        w, b = getattr(module, "weight", None), getattr(module, "bias", None)
        why = None
        if bad:
            why = f"its output also feeds {bad[0]}"
        elif not consumers or not set(consumers) <= active:
            why = "its output feeds no quantized layer"
        elif len(rec.norm_in.get(norm, ())) != 1:
            why = "it is called more than once per forward"
        elif not isinstance(w, nn.Parameter) or not isinstance(b, nn.Parameter) or w.dim() != 1 or b.dim() != 1:
            why = "it has no per-channel weight and bias"
        axes = set()
        for c in consumers if why is None else ():
            layer = layers[c]
            if isinstance(layer, QuantLinear) and layer.in_features == w.numel():
                axes.add(-1)
            elif (isinstance(layer, QuantConv2d) and layer.weight.shape[1] == w.numel() and layer.groups == 1
                  and tuple(layer.weight.shape[2:]) == (1, 1)):
                axes.add(1)
            else:
                why = f"{c} does not read its channels one to one"
        if why is None and len(axes) != 1:
            why = "its consumers read channels along different axes"
        if why is None:
            mappings.append(ScaleMapping(norm, consumers, axes.pop()))
        else:
            rejected[norm] = why
    return mappings, rejected
