"""Quantization methods: one file each, registered by name here.

Adding a method = writing `methods/<name>.py` with a `Method` subclass and adding one line below.
"""
from __future__ import annotations

from vitquant.errors import VitquantError
from vitquant.methods.base import Method

_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if cls.name in _METHODS:
        raise ValueError(f"method {cls.name!r} is registered twice")
    _METHODS[cls.name] = cls
    return cls


# steps any method can take, spelled as a suffix: `repq-vit+qwt` (see methods/qwt.py)
STEPS = ("qwt",)
_COMPOSED: dict[str, type[Method]] = {}


def get_method(name: str) -> type[Method]:
    if name in _METHODS:
        return _METHODS[name]
    base, plus, step = name.rpartition("+") if isinstance(name, str) else ("", "", "")
    if plus and base:
        if step not in STEPS:
            raise VitquantError(f"method {name!r}: unknown step '+{step}'; a method name takes "
                                f"{', '.join('+' + s for s in STEPS)} as a suffix (e.g. 'repq-vit+qwt')")
        if base.rpartition("+")[2] == step:
            raise VitquantError(f"method {name!r} takes '+{step}' twice")
        if name not in _COMPOSED:
            from vitquant.methods.qwt import with_qwt

            _COMPOSED[name] = with_qwt(get_method(base))
        return _COMPOSED[name]
    raise VitquantError(f"unknown method {name!r}; available: {', '.join(sorted(_METHODS))} "
                        f"(each also as '<method>+qwt')")


def available_methods() -> dict[str, type[Method]]:
    return dict(sorted(_METHODS.items()))


# -- the registry: one line per method ------------------------------------------------------------
from vitquant.methods.minmax import MinMax  # noqa: E402
from vitquant.methods.percentile import Percentile  # noqa: E402
from vitquant.methods.repq_vit import RepQViT  # noqa: E402
from vitquant.methods.ias_vit import IaSViT  # noqa: E402
from vitquant.methods.adalog import AdaLog  # noqa: E402
from vitquant.methods.dopq_vit import DopQViT  # noqa: E402
from vitquant.methods.erq import ERQ  # noqa: E402
from vitquant.methods.fq_vit import FQViT  # noqa: E402
from vitquant.methods.ptq4vit import PTQ4ViT  # noqa: E402
from vitquant.methods.noisyquant import NoisyQuant  # noqa: E402
from vitquant.methods.aphq_vit import APHQViT  # noqa: E402
from vitquant.methods.fima_q import FIMAQ  # noqa: E402
from vitquant.methods.best import Best  # noqa: E402

for _m in (MinMax, Percentile, RepQViT, IaSViT, AdaLog, DopQViT, ERQ, FQViT, PTQ4ViT, NoisyQuant, APHQViT, FIMAQ,
           Best):
    register_method(_m)

__all__ = ["Method", "available_methods", "get_method", "register_method"]
