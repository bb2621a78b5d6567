"""From a first traced forward to the handlers to install: which calls become quantization sites.

A call becomes a site when it is
- `F.scaled_dot_product_attention` (an attention core),
- a matmul of two activations (an eager attention's Q·Kᵀ or probs·V, XCiT's cross-covariance …),
- `F.linear`/`F.conv2d` with a twin's weight called outside the twin (routed to the twin),
- with the opt-in extra sites of fully quantized methods: a residual add that feeds a norm (the stream
  itself is quantized), the input of any other norm (a post-norm block's branch output, Swin's patch
  merging), the concatenation of patch tokens with class/register tokens, the position-embedding add.
Weighted calls the core does not understand (a weight that is no twin's, conv1d/3d, transposed convs,
a matmul with a parameter, an einsum of two activations) are reported: refused by default, or left
float and listed when the user asks for that. A matmul or einsum of an activation with a *derived*
constant (relative-position terms such as MViT's) is a float op by the protocol and only listed.

Each site call is keyed by (owner module, kind, index) with the numbering rule of dispatch.py.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from vitquant.models import roles
from vitquant.models.trace import Call, TraceRecord


@dataclass(frozen=True)
class HandlerSpec:
    kind: str  # attention | matmul | foreign | op
    twin: str | None = None
    role: str | None = None  # op: the role of a site on the call's result
    operand_role: str | None = None  # op: the role of a site on operand `index`
    index: int = 0
    scores: bool = False  # attention with the opt-in scores site


@dataclass
class Discovery:
    handlers: dict[str, dict[str, HandlerSpec]]  # owner path → {"sdpa0": spec}
    first_call: dict[tuple[str, str], int]  # (owner, key) → phase-1 call index (for pairing and naming)
    unknown: list[str]  # weighted ops not understood
    float_ops: list[str]  # understood, float by the protocol, reported
    twin_outputs: dict[str, str]  # twin → role of an opt-in output site (branch_out, logits, embed)
    pairs: dict[int, int]  # probs·V call index → its Q·Kᵀ call index
    float_norm_inputs: list[str] = field(default_factory=list)  # extras asked, but a norm's input has no site


def _inner(call: Call) -> str:
    return call.stack[-1][0] if call.stack else ""


def _describe(call: Call, what: str) -> str:
    return f"{_inner(call) or 'the model'}: {what} ({call.name})"


def discover(rec: TraceRecord, twin_weights: dict[int, str], extras: set[str]) -> Discovery:
    worthy: dict[int, HandlerSpec] = {}
    unknown, float_ops = [], []
    twin_outputs: dict[str, str] = {}
    image_twins = {t for t, p in rec.layer_in.items() if p.kind == "input"}
    for call in rec.calls:
        acts = [p for p in call.operands if p.act]
        if call.kind == "sdpa":
            worthy[call.index] = HandlerSpec("attention", scores=roles.ATTN_SCORES in extras)
        elif call.kind == "matmul" or call.name == "einsum":
            if len(acts) >= 2:
                if call.name == "einsum":
                    unknown.append(_describe(call, "einsum of two activations"))
                else:
                    worthy[call.index] = HandlerSpec("matmul")
            elif acts:
                if any(call.params):
                    unknown.append(_describe(call, "matmul with a parameter (a hand-written linear layer)"))
                else:
                    float_ops.append(_describe(call, "product with a constant table (relative position term), float"))
        elif call.name in ("linear", "conv2d"):
            twin = twin_weights.get(call.weight)
            if twin is not None and twin != _inner(call):
                worthy[call.index] = HandlerSpec("foreign", twin=twin)
            elif twin is None and acts:
                unknown.append(_describe(call, "weight that belongs to no Linear/Conv2d layer"))
        elif call.name in ("conv1d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
                           "bilinear", "embedding", "baddbmm", "addmm", "addbmm") and acts:
            unknown.append(_describe(call, "layer type without a quantized twin"))
    float_norm_inputs: list[str] = []
    if roles.RESIDUAL in extras or roles.EMBED in extras:
        float_norm_inputs = _extra_sites(rec, extras, worthy, image_twins, twin_outputs)
    if roles.LOGITS in extras and rec.output is not None:
        for head in rec.output.heads:
            twin_outputs[head] = roles.LOGITS
    handlers, first_call = _number(rec, worthy, unknown)
    pairs = {}  # probs·V → Q·Kᵀ: the first operand of ·V derives from the Q·Kᵀ (softmax, masks, talking heads)
    for call in rec.calls:
        spec, qk = worthy.get(call.index), call.operands[0].qk if call.operands else None
        if spec is not None and spec.kind == "matmul" and qk is not None and getattr(worthy.get(qk), "kind", "") == "matmul":
            pairs[call.index] = qk
    return Discovery(handlers, first_call, unknown, float_ops, twin_outputs, pairs, float_norm_inputs)


def _extra_sites(rec: TraceRecord, extras: set[str], worthy: dict[int, HandlerSpec], image_twins: set[str],
                 twin_outputs: dict[str, str]) -> list[str]:
    """FQ-ViT's sites outside the matmuls, found by what feeds what. Returns the norms whose input
    could not be given a site (a norm computed without F.layer_norm/F.group_norm)."""
    feeds_norm = {p.cp_add for provs in rec.norm_in.values() for p in provs if p.cp_add is not None}
    embed_cats = set()
    for call in rec.calls:
        if roles.RESIDUAL in extras and call.kind == "add" and call.index in feeds_norm:
            worthy[call.index] = HandlerSpec("op", role=roles.RESIDUAL)
            if roles.BRANCH_OUT in extras:
                for p in call.operands:
                    if p.act and p.branch is not None and p.kind in ("linear", "conv"):
                        twin_outputs.setdefault(p.branch, roles.BRANCH_OUT)
        if roles.EMBED in extras and call.kind == "cat":
            acts = [p for p in call.operands if p.act]
            if acts and len(acts) < len(call.operands) and any(p.branch in image_twins for p in acts):
                worthy[call.index] = HandlerSpec("op", role=roles.EMBED)
                embed_cats.add(call.index)
    if roles.EMBED in extras and not embed_cats:  # no class token: the patch tokens themselves
        for twin in image_twins:
            twin_outputs[twin] = roles.EMBED
    covered = set()
    for call in rec.calls:  # every other norm input: the quantized norm input of a fully quantized model
        if roles.RESIDUAL not in extras or call.kind != "norm" or not call.operands or not call.operands[0].act:
            continue
        p = call.operands[0]
        covered.add(_inner(call))
        if getattr(worthy.get(p.cp_add), "role", None) == roles.RESIDUAL:
            continue  # the residual stream itself is quantized
        if roles.EMBED in extras and not embed_cats and p.branch in image_twins:
            continue  # the patch tokens' embed site
        worthy[call.index] = HandlerSpec("op", operand_role=roles.RESIDUAL, index=0)
    if roles.EMBED not in extras:
        return sorted(set(rec.norm_in) - covered) if roles.RESIDUAL in extras else []
    for call in rec.calls:
        if call.kind != "add":
            continue
        acts = [i for i, p in enumerate(call.operands) if p.act]
        consts = [i for i, p in enumerate(call.operands) if not p.act]
        if len(acts) == 1 and len(consts) == 1:
            p = call.operands[acts[0]]
            if p.cp_embed in embed_cats or (not embed_cats and p.branch in image_twins):
                out = worthy.get(call.index)  # the same add may also be the first residual site
                worthy[call.index] = HandlerSpec("op", role=out.role if out else None, operand_role=roles.POS_EMBED,
                                                 index=consts[0])
                break
    return sorted(set(rec.norm_in) - covered) if roles.RESIDUAL in extras else []


def _number(rec: TraceRecord, worthy: dict[int, HandlerSpec], unknown: list[str]):
    """Key every site call by (owner, kind+index) exactly as dispatch.py numbers calls at run time."""
    owners = {_inner(rec.calls[i]) for i in worthy}
    counters: dict[tuple, int] = defaultdict(int)
    table: dict[tuple[str, str], list[HandlerSpec | None]] = defaultdict(list)
    first_call: dict[tuple[str, str], int] = {}
    for call in rec.calls:
        if call.kind is None:
            continue
        owner = next(((p, inv) for p, inv in reversed(call.stack) if p in owners), None)
        if owner is None:
            continue
        key = f"{call.kind}{counters[(*owner, call.kind)]}"
        counters[(*owner, call.kind)] += 1
        table[(owner[0], key)].append(worthy.get(call.index))
        first_call.setdefault((owner[0], key), call.index)
    handlers: dict[str, dict[str, HandlerSpec]] = {o: {} for o in owners}
    for (owner, key), specs in table.items():
        if all(s is None for s in specs):
            continue
        if any(s != specs[0] for s in specs):
            unknown.append(f"{owner or 'the model'}: computes different things at its call {key} on repeated calls")
            continue
        handlers[owner][key] = specs[0]
    return handlers, first_call
