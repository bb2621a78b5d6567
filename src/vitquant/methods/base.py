"""What a quantization method is: a name, its options, and a `calibrate` that fits every quantizer."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import TYPE_CHECKING, Any, ClassVar

from vitquant.errors import VitquantError

if TYPE_CHECKING:
    from vitquant.calibration.engine import Context
    from vitquant.config import QuantConfig


_TRUE, _FALSE, _NONE = ("true",), ("false",), ("none", "null")


def _describe(tp: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _scalar(method: str, key: str, value: Any, tp: Any) -> Any:
    """`value` as `tp` (bool, int, float or str), or a VitquantError naming the option and the form it takes."""
    def bad() -> VitquantError:
        return VitquantError(f"option {key!r} of method {method!r} must be {_describe(tp)}, got {value!r}")

    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise bad()
    if tp in (int, float):
        number = value
        if isinstance(value, str):
            try:
                number = float(value.strip()) if tp is float else int(value.strip())
            except ValueError:
                raise bad() from None
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise bad()
        if tp is int:
            if float(number) != int(number):
                raise bad()
            return int(number)
        return float(number)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    return value


def coerce_option(method: str, key: str, value: Any, tp: Any) -> Any:
    """Coerce one option value to its declared type: bool, int, float, str, X | None, Literal[...],
    tuple[X, ...] / tuple[X, Y] (from a list, or a comma-separated string); other types pass through."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        rest = [a for a in args if a is not type(None)]
        return coerce_option(method, key, value, rest[0] if len(rest) == 1 else Any)
    if origin is typing.Literal:
        if isinstance(value, str) and any(isinstance(a, bool) for a in args) and value.strip().lower() in _TRUE + _FALSE:
            value = value.strip().lower() in _TRUE  # "true"/"false" from the CLI, where the literal allows a bool
        if not any(type(value) is type(a) and value == a for a in args):  # 1 is not True
            shown = (", ".join(str(a).lower() if isinstance(a, bool) else repr(a) for a in args)
                     if any(isinstance(a, bool) for a in args) else list(args))
            raise VitquantError(f"option {key!r} of method {method!r} must be one of {shown}, got {value!r}")
        return value
    if origin is tuple:
        elems = [a for a in args if a is not Ellipsis]
        noun = {int: "integers", float: "numbers"}.get(elems[0], "values") if elems else "values"
        count = "" if args[-1:] == (Ellipsis,) else f"{len(args)} "
        form = f"a list of {count}{noun}, e.g. [{', '.join(['1', '2'] if elems[:1] == [int] else ['0.99', '0.999'])}]"
        shown = value
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and not count:
            value = [value]
        try:
            if not isinstance(value, (list, tuple)) or (count and len(value) != len(args)):
                raise VitquantError("")
            return tuple(_scalar(method, key, v, a) for v, a in zip(value, args if count else [elems[0]] * len(value)))
        except VitquantError:
            raise VitquantError(f"option {key!r} of method {method!r} must be {form}, got {shown!r}") from None
    return _scalar(method, key, value, tp)


@dataclasses.dataclass
class NoOptions:
    pass


class Method:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for `vitquant list`
    Options: ClassVar[type] = NoOptions
    # opt-in site groups prepare() must create (vitquant.models.roles.EXTRA_SITES); quantize() and
    # load() pass them to prepare()
    requires_sites: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def validate_options(cls, options: dict[str, Any] | None) -> dict[str, Any]:
        """Check user options against the method's Options dataclass; returns them with defaults filled.

        Values are coerced to the field's declared type first (the CLI hands over JSON values, or the
        raw string when a value is not JSON), so `reparam_head=False` is the boolean, not a truthy
        string; enumerations are checked by each Options' own __post_init__.
        """
        options = dict(options or {})
        allowed = {f.name for f in dataclasses.fields(cls.Options)}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise VitquantError(
                f"method {cls.name!r} has no option(s) {unknown}; its options are {sorted(allowed) or 'none'}"
            )
        hints = typing.get_type_hints(cls.Options)
        coerced = {k: coerce_option(cls.name, k, v, hints.get(k, Any)) for k, v in options.items()}
        try:
            return dataclasses.asdict(cls.Options(**coerced))
        except (TypeError, ValueError, VitquantError) as e:
            raise VitquantError(f"method {cls.name!r}: invalid options {coerced}: {e}") from None

    def options(self, config: "QuantConfig"):
        return self.Options(**config.options)

    def check(self, structure) -> None:
        """Raise a VitquantError naming what this method cannot handle in `structure` (before any work)."""

    def fit(self, qmodel, calib, config: "QuantConfig", progress: bool = True) -> None:
        """Calibrate a prepared model: resolve the per-site plan, build the context, run `calibrate`."""
        from vitquant.calibration.engine import Context
        from vitquant.plan import SitePlan

        self.check(qmodel.structure)
        self.calibrate(Context(qmodel, calib, config, SitePlan.resolve(config, qmodel.structure), progress))

    def calibrate(self, ctx: "Context") -> None:
        """Fit every quantizer of `ctx.qmodel` as `ctx.plan` says (bits per site, None = float)."""
        raise NotImplementedError
