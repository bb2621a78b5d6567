"""The verbs: quantize, evaluate, save, load."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vitquant import distributed
from vitquant.calibration.data import CalibrationSet, data_config_for, load_calibration
from vitquant.calibration.datafree import generated_calibration, is_generated_source
from vitquant.calibration.engine import Context
from vitquant.config import QuantConfig
from vitquant.errors import VitquantError
from vitquant.methods import get_method
from vitquant.methods.best import resolve as resolve_best
from vitquant.methods.deployable import make_deployable
from vitquant.methods.steps import apply_plan, freeze
from vitquant.models import QuantizedModel, prepare
from vitquant.models.io import input_size_of, refuse_nonfinite
from vitquant.models.sources import infer_source
from vitquant.plan import SitePlan
from vitquant.profiling import measure, release_memory


def quantize(
    model: nn.Module,
    config: QuantConfig | str | None = None,
    calib: Any = "bundled",
    *,
    progress: bool = True,
    input_size: tuple[int, int, int] | None = None,
    allow_nonfinite: bool = False,
    min_images: int = 8,
) -> QuantizedModel:
    """Return a quantized copy of `model` (the float model is left untouched).

    config: a QuantConfig, or a bits preset such as "w4a4" for the default method.
    calib: a CalibrationSet, an image folder, a tensor of preprocessed images [N, C, H, W], a
        DataLoader/Dataset of them, or "bundled" (MNIST-5k, for the bundled reference models); or, with
        no images at all, "data-free" (PSAQ-ViT images generated from the float model; a DataFreeConfig
        sets how) or "gaussian" (pure noise, the baseline).
    input_size: (C, H, W) for a model that does not tell its own (a plain nn.Module); read from a tensor
        of calibration images when not given.
    allow_nonfinite: quantize even if weights hold NaN/Inf (refused by default: the result is garbage).
    min_images: the fewest readable calibration images accepted from a folder or tensor.
    """
    if config is None:
        config = QuantConfig()
    elif isinstance(config, str):
        config = QuantConfig.preset(config)
    elif not isinstance(config, QuantConfig):
        raise VitquantError(f"config must be a QuantConfig or a bits preset like 'w4a4', not {type(config).__name__}")
    if isinstance(model, QuantizedModel):
        raise VitquantError("this model is already quantized; pass the float model")
    asked = config.method
    config = resolve_best(config)  # `best` becomes the recipe it runs, which the model then records
    if not allow_nonfinite:
        refuse_nonfinite(model, f"this {type(model).__name__}")
    method = get_method(config.method)()
    # the architecture is understood (or refused) before any image is decoded or generated
    if input_size is None and input_size_of(model) is None:
        images = calib.images if isinstance(calib, CalibrationSet) else calib
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            input_size = tuple(images.shape[1:])
    qmodel = prepare(model, source=infer_source(model), extra_sites=method.requires_sites,
                     unknown=config.unknown_layers, input_size=input_size)
    release_memory()  # tracing frees ~210 MB of heap on DeiT-S: give it back before calibration fragments it
    method.check(qmodel.structure)
    plan = SitePlan.resolve(config, qmodel.structure)
    generation_stats: dict[str, Any] = {}
    if is_generated_source(calib):  # needs the float model itself, so not a load_calibration source
        calib, generation_stats = generated_calibration(model, calib, config.calib_size, config.seed, progress,
                                                        structure=qmodel.structure)
    elif not isinstance(calib, CalibrationSet):
        calib = load_calibration(calib, data_config_for(model, qmodel.structure.input_shape),
                                 n=config.calib_size, seed=config.seed, min_images=min_images)
    torch.manual_seed(config.seed)
    with measure() as m:
        # under torchrun every rank calibrates (the observe pass split among them, see Context.observe) and
        # ends with the same quantizers; progress shows on rank 0
        method.calibrate(Context(qmodel, calib, config, plan, progress and distributed.is_main(), float_model=model))
        apply_plan(qmodel, plan)
        stand_ins = make_deployable(qmodel) if config.deployable else []
        freeze(qmodel)
    qmodel.config = config
    qmodel.stats = {
        "calibration_seconds": round(m.seconds, 3),
        "calibration_peak_rss_mb": round(m.peak_rss_mb, 1),
        "calibration_images": int(calib.images.shape[0]),
        "calibration_source": calib.source,
        **({"recipe": f"{asked} → {config.method}"} if asked != config.method else {}),
        **generation_stats,
        **({"deployable_stand_ins": stand_ins} if config.deployable else {}),
        **({"float_sites": plan.float_sites} if plan.float_sites else {}),
        **({"float_ops": list(qmodel.structure.float_ops)} if qmodel.structure.float_ops else {}),
    }
    return qmodel.eval()
