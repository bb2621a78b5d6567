"""Site roles: *what kind of tensor* a quantization site sees, derived from the traced forward.

Methods pick a quantizer per role (log√2 for post-softmax, twin uniform for post-GELU, channel-wise
for post-LayerNorm …). Nothing declares a role by hand: `role_of_input` maps the producer the tracer
found (trace.py) and the consumer to one of these names, for every architecture alike.
"""
from __future__ import annotations

# consumer = a Linear/Conv input
IMAGE = "image"  # the model input itself (a patch-embedding conv, a conv stem)
HEAD = "head"  # input of a layer whose output is the model output (classifier), whatever produced it
POST_LN = "post_ln"  # produced by a token norm (LayerNorm, RMSNorm, GroupNorm, LayerNorm2d): outlier channels
POST_BN = "post_bn"  # produced by a BatchNorm
ATTN_OUT = "attn_out"  # produced by an attention (softmax·V), through head merging
POST_GELU = "post_gelu"  # produced by GELU / QuickGELU
POST_ACT = "post_act"  # produced by another activation (SiLU, ReLU, Hardswish, sigmoid…)
GATED = "gated"  # the product of two activations (SwiGLU, gated MLPs)
RESIDUAL_IN = "residual_in"  # the sum of two activations (a residual stream read without a norm)
# consumer = an operand of an activation × activation matmul
QK = "qk"  # q and k, the operands of Q·Kᵀ
V = "v"  # the second operand of probs·V
POST_SOFTMAX = "post_softmax"  # softmax probabilities: the first operand of probs·V (or a layer input)
ATTN_WEIGHTS = "attn_weights"  # the first operand of ·V that is not a softmax output (talking heads)
MATMUL = "matmul"  # an operand of any other activation × activation matmul
OTHER = "other"
# opt-in sites of "fully quantized" methods (FQ-ViT, `prepare(extra_sites=...)`)
EMBED = "embed"  # patch tokens joined with the class/register tokens
POS_EMBED = "pos_embed"  # the position embedding added to them (a constant)
RESIDUAL = "residual"  # the residual stream after an add that feeds a norm
BRANCH_OUT = "branch_out"  # a branch's last layer output, before the residual add
ATTN_SCORES = "attn_scores"  # Q·Kᵀ·scale, the softmax input
LOGITS = "logits"  # the classifier output

ROLES = (IMAGE, HEAD, POST_LN, POST_BN, ATTN_OUT, POST_GELU, POST_ACT, GATED, RESIDUAL_IN, QK, V, POST_SOFTMAX,
         ATTN_WEIGHTS, MATMUL, OTHER, EMBED, POS_EMBED, RESIDUAL, BRANCH_OUT, ATTN_SCORES, LOGITS)
EXTRA_SITES = (EMBED, RESIDUAL, BRANCH_OUT, ATTN_SCORES, LOGITS)  # what `requires_sites` may ask for

_BY_PRODUCER = {
    "input": IMAGE, "norm": POST_LN, "batchnorm": POST_BN, "attn": ATTN_OUT, "gelu": POST_GELU, "act": POST_ACT,
    "gated": GATED, "residual": RESIDUAL_IN, "softmax": POST_SOFTMAX,
}


def role_of_input(producer: str, is_head: bool) -> str:
    """The role of a Linear/Conv input whose tensor came from `producer` (a trace.Prov kind)."""
    if producer == "input":
        return IMAGE
    if is_head:
        return HEAD
    return _BY_PRODUCER.get(producer, OTHER)
