"""What a quantization method is: a name, its options, and a `calibrate` that fits every quantizer."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

from vitquant.errors import VitquantError

if TYPE_CHECKING:
    from vitquant.calibration.engine import Context
    from vitquant.config import QuantConfig


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
        """Check user options against the method's Options dataclass; returns them with defaults filled."""
        options = dict(options or {})
        allowed = {f.name for f in dataclasses.fields(cls.Options)}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise VitquantError(
                f"method {cls.name!r} has no option(s) {unknown}; its options are {sorted(allowed) or 'none'}"
            )
        try:
            return dataclasses.asdict(cls.Options(**options))
        except (TypeError, ValueError) as e:
            raise VitquantError(f"method {cls.name!r}: invalid options {options}: {e}") from None

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
