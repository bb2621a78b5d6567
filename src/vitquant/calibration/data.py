"""Where calibration and evaluation images come from: the bundled MNIST-5k split, image folders, tensors, loaders.

Every image is preprocessed exactly as the model was trained (timm's `pretrained_cfg`: input size,
interpolation, crop_pct, mean/std): activation ranges measured on differently normalized inputs are
wrong ranges, so there is no way to pass a separate transform here. Images in 16-bit (and other) modes
are brought to 8 bits by scaling, never by clipping; files that cannot be decoded, or whose value range
is unknown (float images), are skipped and counted. `check_source` / `check_class_count` are the cheap
checks a command runs before loading any model.
"""
from __future__ import annotations

import inspect
import os
import random
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from tqdm import tqdm

from vitquant.datasets.mnist import mnist5k_split
from vitquant.errors import VitquantError
from vitquant.models.io import input_size_of

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
BUNDLED = "bundled"
_BUNDLED_INPUT_SIZE = (1, 28, 28)
_PROGRESS_MIN_FILES = 64  # below this a progress bar is noise
_SOURCES_HINT = "pass 'bundled', an image folder, a tensor [N, C, H, W], or a DataLoader/Dataset of preprocessed tensors"


def data_config_for(model: torch.nn.Module, input_size: tuple[int, ...] | None = None) -> dict:
    """The model's own eval preprocessing: input_size, interpolation, mean, std, crop_pct, crop_mode.

    The input size is the one the model is built for (`input_size`, or read from the model: a timm ViT
    built with img_size=384, an HF config's image_size), not the one a pretrained config may name; the
    rest comes from the model's `pretrained_cfg` (timm, or set by vitquant's loaders for HF and
    torchvision models).
    """
    pretrained_cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    size = input_size or input_size_of(model)
    if size is not None:
        pretrained_cfg["input_size"] = tuple(int(v) for v in size)
    if not pretrained_cfg.get("mean") or not pretrained_cfg.get("std"):
        warnings.warn(f"{type(model).__name__} carries no pretrained_cfg mean/std, so ImageNet normalization is "
                      "assumed; set model.pretrained_cfg to the preprocessing the model was trained with",
                      stacklevel=2)
    cfg = resolve_data_config({}, pretrained_cfg=pretrained_cfg or None, model=model)
    # Sidecar JSON files store lists; tuples keep configs comparable and hashable.
    cfg["input_size"] = tuple(int(v) for v in cfg["input_size"])
    cfg["mean"] = tuple(float(v) for v in cfg["mean"])
    cfg["std"] = tuple(float(v) for v in cfg["std"])
    cfg["crop_pct"] = float(cfg["crop_pct"])
    return cfg


@dataclass
class CalibrationSet:
    """Preprocessed model inputs [N, C, H, W] (float32) and where they came from."""

    images: torch.Tensor
    source: str
    skipped: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int = 32) -> Iterator[torch.Tensor]:
        yield from self.images.split(batch_size)


@dataclass
class LabeledSet:
    """Preprocessed images [N, C, H, W], int64 labels [N], and class names when the source has them."""

    images: torch.Tensor
    labels: torch.Tensor
    source: str
    classes: list[str] | None
    skipped: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from zip(self.images.split(batch_size), self.labels.split(batch_size))


def load_calibration(source, data_cfg: dict, n: int = 32, seed: int = 0, min_images: int = 8) -> CalibrationSet:
    """n calibration inputs from `source`, preprocessed with `data_cfg` (see `data_config_for`)."""
    if n < max(1, min_images):
        raise VitquantError(f"n={n} calibration images requested, but calibration needs at least {max(1, min_images)}; "
                            f"ask for n >= {max(1, min_images)} (or lower min_images)")
    if isinstance(source, str) and source == BUNDLED:
        images, _ = _bundled("train", data_cfg)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
        what = "the bundled MNIST-5k train split"
        result = CalibrationSet(images[order], f"bundled MNIST-5k train split ({len(order)} of {len(images)} images)", [])
    elif isinstance(source, (str, os.PathLike)):
        what = f"calibration folder '{source}'"
        result = _calibration_from_folder(Path(source), data_cfg, n, seed)
    elif isinstance(source, torch.Tensor):
        what = "calibration tensor"
        _check_shape(source, data_cfg, what)
        order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))[:n]
        images = source.detach()[order].to("cpu", torch.float32)
        result = CalibrationSet(images, f"tensor ({len(images)} of {len(source)} images)", [])
    elif isinstance(source, (torch.utils.data.DataLoader, torch.utils.data.Dataset)):
        what = "calibration " + _loader_kind(source)
        result = _calibration_from_loader(source, data_cfg, n)
    else:
        raise VitquantError(f"unsupported calibration source of type {type(source).__name__}; {_SOURCES_HINT}")
    if len(result.images) < min_images:
        unreadable = f" ({len(result.skipped)} more could not be decoded)" if result.skipped else ""
        raise VitquantError(f"{what} holds only {len(result.images)} readable images{unreadable}; "
                            f"calibration needs at least {min_images} (add images, or lower the minimum: "
                            "--min-calib N, min_images=N)")
    return result


def load_labeled(source, data_cfg: dict, limit: int | None = None) -> LabeledSet:
    """Labeled evaluation images: 'bundled' (the 1000-image MNIST-5k test split) or an ImageFolder folder.

    `limit` keeps the first `limit` samples after a shuffle with seed 0, so a subset mixes the classes.
    Everything is decoded into memory, which suits the folder sizes we test with; ImageNet-size folders
    would need a streaming loader (a later improvement).
    """
    if limit is not None and limit < 1:
        raise VitquantError(f"limit={limit} keeps no evaluation images; pass a positive limit or None for all")
    if isinstance(source, str) and source == BUNDLED:
        images, labels = _bundled("test", data_cfg)
        total = len(images)
        if limit is not None:
            keep = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:limit]
            images, labels = images[keep], labels[keep]
        return LabeledSet(images, labels, f"bundled MNIST-5k test split ({len(images)} of {total} images)",
                          [str(d) for d in range(10)], [])
    if not isinstance(source, (str, os.PathLike)):
        raise VitquantError(f"unsupported evaluation source of type {type(source).__name__}; "
                            "pass 'bundled' or an ImageFolder folder (one subfolder per class)")
    folder, classes, files = labeled_files(source)
    if limit is not None:
        random.Random(0).shuffle(files)
    want = len(files) if limit is None else min(limit, len(files))
    images, used, skipped = _decode_until(folder, [path for path, _ in files], want, data_cfg, "evaluation")
    labels = torch.tensor([files[i][1] for i in used], dtype=torch.int64)
    return LabeledSet(images, labels, _folder_description(folder, len(images), len(files), skipped), classes, skipped)


def labeled_files(source: str | os.PathLike) -> tuple[Path, list[str], list[tuple[Path, int]]]:
    """An ImageFolder folder's (folder, class names in sorted order, [(image file, class index)]), the files
    in class order and sorted within each class."""
    folder = _existing_folder(Path(source), "evaluation")
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise VitquantError(f"evaluation folder '{folder}' has no class subfolders; evaluation needs an ImageFolder "
                            "layout (one subfolder per class, e.g. cat/1.jpg, dog/2.jpg)")
    files = [(path, label) for label, name in enumerate(classes) for path in _image_files(folder / name)]
    if not files:
        raise VitquantError(f"evaluation folder '{folder}' holds no image files in its {len(classes)} class "
                            f"subfolders (looked for {_extensions_text()}); add images to the class subfolders")
    return folder, classes, files


def check_source(source, role: str, min_images: int = 1) -> int | None:
    """The cheap checks of a 'bundled'/folder source, run before any model is loaded (a calibration folder
    with fewer image files than `min_images` cannot do); for an evaluation folder, returns its number of
    classes (None for 'bundled' and non-path sources)."""
    if not isinstance(source, (str, os.PathLike)) or source == BUNDLED:
        return None
    folder = _existing_folder(Path(source), role)
    if role != "evaluation":
        found = len(_image_files(folder))
        if 0 < found < min_images:
            raise VitquantError(f"{role} folder '{folder}' holds only {found} image files; calibration needs at "
                                f"least {min_images} (add images, or lower the minimum: --min-calib N)")
        return None
    classes = [e for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")]
    if not classes:
        raise VitquantError(f"evaluation folder '{folder}' has no class subfolders; evaluation needs an ImageFolder "
                            "layout (one subfolder per class, e.g. cat/1.jpg, dog/2.jpg)")
    return len(classes)


def _model_classes(model) -> int | None:
    inner = getattr(model, "model", model)  # a QuantizedModel's float module
    for n in (getattr(inner, "num_classes", None), getattr(getattr(inner, "config", None), "num_labels", None)):
        if isinstance(n, int) and n > 0:
            return n
    session = getattr(model, "session", None)  # an ONNX Runtime model
    if session is not None:
        shape = session.get_outputs()[0].shape
        return shape[-1] if shape and isinstance(shape[-1], int) else None
    return None


def check_class_count(model, folder_classes: int | None) -> None:
    """Warn when an evaluation folder's class count differs from the model's outputs: labels are folder
    indices in sorted order, so the accuracy means something only if those are the model's classes."""
    n = _model_classes(model)
    if folder_classes is not None and n is not None and n != folder_classes:
        warnings.warn(f"the model has {n} output classes but the evaluation folder {folder_classes} class "
                      f"subfolders; top-1 counts an image correct only when the model's class index equals its "
                      "folder's index in sorted order, so this accuracy is only meaningful if the folder's classes "
                      "are the model's first ones in that order", stacklevel=2)


def _bundled(split: str, data_cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    input_size = tuple(data_cfg["input_size"])
    if input_size != _BUNDLED_INPUT_SIZE:
        raise VitquantError(f"the bundled set is 28x28 grayscale MNIST, but the model expects input_size "
                            f"{input_size}; pass a folder of images instead")
    # Normalize with the model's own mean/std rather than trusting that it was trained with MNIST's.
    # The images are already at the model's resolution, so resize/crop would be identities.
    images, labels = mnist5k_split(split, normalize=False)
    mean = torch.tensor(data_cfg["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(data_cfg["std"], dtype=torch.float32).view(1, -1, 1, 1)
    return (images - mean) / std, labels


def _calibration_from_folder(path: Path, data_cfg: dict, n: int, seed: int) -> CalibrationSet:
    folder = _existing_folder(path, "calibration")
    files = _image_files(folder)
    if not files:
        raise VitquantError(f"calibration folder '{folder}' holds no image files (looked recursively for "
                            f"{_extensions_text()}); point it at a folder of images")
    # A seeded permutation of the whole sorted list: its first n files are the draw, the rest replace
    # files that turn out unreadable, so one corrupt file does not shrink the set.
    order = random.Random(seed).sample(files, len(files))
    images, _, skipped = _decode_until(folder, order, min(n, len(files)), data_cfg, "calibration")
    return CalibrationSet(images, _folder_description(folder, len(images), len(files), skipped), skipped)


def _calibration_from_loader(loader, data_cfg: dict, n: int) -> CalibrationSet:
    kind = _loader_kind(loader)
    items = (loader[i] for i in range(len(loader))) if _is_map_dataset(loader) else iter(loader)
    chunks, count = [], 0
    for item in items:
        chunk = _as_image_batch(item, kind)
        _check_shape(chunk, data_cfg, f"{kind} item")
        chunks.append(chunk[: n - count].detach().to("cpu", torch.float32))
        count += len(chunks[-1])
        if count >= n:
            break
    c, h, w = tuple(data_cfg["input_size"])
    images = torch.cat(chunks) if chunks else torch.empty(0, c, h, w)
    return CalibrationSet(images, f"{kind} (first {len(images)} images)", [])


def _loader_kind(loader) -> str:
    return "DataLoader" if isinstance(loader, torch.utils.data.DataLoader) else f"Dataset {type(loader).__name__}"


def _is_map_dataset(source) -> bool:
    return (isinstance(source, torch.utils.data.Dataset) and not isinstance(source, torch.utils.data.IterableDataset)
            and hasattr(source, "__len__"))


def _as_image_batch(item, kind: str) -> torch.Tensor:
    if isinstance(item, Sequence) and not isinstance(item, str) and len(item) > 0:
        item = item[0]  # (image, label) pairs: the label is not needed for calibration
    if isinstance(item, torch.Tensor) and item.ndim in (3, 4):
        return item.unsqueeze(0) if item.ndim == 3 else item
    raise VitquantError(f"{kind} yields {type(item).__name__} items; calibration needs preprocessed image tensors "
                        "[C, H, W] or [B, C, H, W] (alone or as (image, label)); apply the model's transform "
                        "(see data_config_for) or pass an image folder")


def _check_shape(images: torch.Tensor, data_cfg: dict, what: str) -> None:
    expected = tuple(data_cfg["input_size"])
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise VitquantError(f"{what} has shape {tuple(images.shape)}, but the model expects [N, {', '.join(map(str, expected))}] "
                            f"(data_cfg input_size {expected}); resize/normalize the images to that size or pass an image folder")


def _existing_folder(path: Path, role: str) -> Path:
    if not path.exists():
        raise VitquantError(f"{role} folder '{path}' does not exist; check the path")
    if not path.is_dir():
        raise VitquantError(f"{role} source '{path}' is a file, not a folder; pass the folder that holds the images")
    return path


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _extensions_text() -> str:
    return ", ".join(sorted(IMAGE_EXTENSIONS))


def _decode_until(folder: Path, files: list[Path], want: int, data_cfg: dict, role: str
                  ) -> tuple[torch.Tensor, list[int], list[str]]:
    """Decode `files` in order until `want` succeed: (images, indices of the files used, unreadable paths)."""
    channels = int(data_cfg["input_size"][0])
    if channels not in (1, 3):
        raise VitquantError(f"image folders can feed models with 1 or 3 input channels, but this model expects "
                            f"{channels}; pass a preprocessed tensor [N, {channels}, H, W] instead")
    mode = "L" if channels == 1 else "RGB"
    transform = _eval_transform(data_cfg)
    images, used, skipped, unusual = [], [], [], {}
    show = len(files) >= _PROGRESS_MIN_FILES and sys.stderr.isatty()
    with tqdm(total=want, desc=f"decoding {role} images", unit="img", disable=not show) as bar:
        for index, path in enumerate(files):
            if len(images) == want:
                break
            try:
                with Image.open(path) as image:
                    images.append(transform(to_mode(image, mode)))
            except UnsupportedImageMode as e:
                skipped.append(str(path))
                unusual[e.mode] = unusual.get(e.mode, 0) + 1
                continue
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                skipped.append(str(path))
                continue
            used.append(index)
            bar.update(1)
    skipped.sort()
    modes = "" if not unusual else (" (" + ", ".join(f"{n} in image mode {m}, whose value range is unknown"
                                                    for m, n in sorted(unusual.items())) + ")")
    if not images:
        raise VitquantError(f"{role} folder '{folder}' holds 0 readable images ({len(skipped)} files could not be "
                            f"decoded{modes}: {_names(folder, skipped)}); replace them with valid 8- or 16-bit "
                            "image files")
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image file(s){modes} in {role} folder '{folder}': "
                      f"{_names(folder, skipped)}", stacklevel=3)
    return torch.stack(images), used, skipped


class UnsupportedImageMode(ValueError):
    def __init__(self, mode: str) -> None:
        super().__init__(f"image mode {mode} has no known value range")
        self.mode = mode


_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """`image` as 8-bit "L" or "RGB", scaling wider integer images instead of clipping them.

    PIL's convert("L") clips a 16-bit image at 255, so a 16-bit PNG would arrive as a white square;
    16-bit values are mapped onto 0..255 (÷257, so 65535 → 255). A 32-bit "I" image is read as 16-bit
    when its values fit 0..65535 (how older Pillow opens 16-bit PNGs); float ("F") images and wider
    integers have no known range and are refused (the caller skips and counts them).
    """
    if image.mode in _SIXTEEN_BIT or image.mode == "I":
        values = np.asarray(image).astype(np.float64)
        if image.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise UnsupportedImageMode(image.mode)
        image = Image.fromarray(np.round(values / 257.0).clip(0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        raise UnsupportedImageMode(image.mode)
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns on every such file when converting a palette straight to RGB
    try:
        return image.convert(mode)
    except ValueError:  # e.g. LAB converts to RGB but not to L
        return image.convert("RGB").convert(mode)


def _eval_transform(data_cfg: dict):
    accepted = inspect.signature(create_transform).parameters
    return create_transform(**{k: v for k, v in data_cfg.items() if k in accepted and k != "is_training"},
                            is_training=False)


def _names(folder: Path, paths: list[str], shown: int = 3) -> str:
    names = [Path(p).relative_to(folder).as_posix() for p in paths[:shown]]
    return ", ".join(names) + (f", … ({len(paths) - shown} more)" if len(paths) > shown else "")


def _folder_description(folder: Path, used: int, total: int, skipped: list[str]) -> str:
    unreadable = f", {len(skipped)} unreadable skipped" if skipped else ""
    return f"folder {folder} ({used} of {total} images{unreadable})"
