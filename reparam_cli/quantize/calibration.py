"""Calibration inputs for `reparam quantize`: where the activation ranges and every figure come from.

    (nothing)            N(0, 1) tensors of the spec's input shape: indicative only (say so)
    --calib DIR          images decoded with Pillow, resized to the input's H x W, scaled to [0, 1]
                         and normalised with --mean/--std, else timm's data config for timm specs,
                         else ImageNet's for 3-channel inputs (none for ultralytics, which takes [0, 1])
    --calib FILE.npz     the array `inputs` or `images` (else the first), optional `labels`
    --calib FILE.npy     one array (N, C, H, W)
    spec.py              a Python spec's calibration_inputs(n, shape) -> tensor (N, ...) or (tensor, labels)

Every problem with these inputs is a ReparamError: one line, exit 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from reparam_cli.core.spec import _import_file
from reparam_cli.errors import ReparamError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class CalibrationError(ReparamError):
    """Calibration inputs that cannot be used."""


@dataclass
class Calibration:
    """Samples (N, ...) float32, optional labels (N,), where they came from and a note."""

    inputs: Tensor
    labels: Tensor | None
    source: str
    note: str = ""

    def split(self, batch: int = 16) -> tuple[list[tuple], list[tuple], Tensor | None]:
        """(calibration batches, held-out batches, held-out labels): the last quarter (at least one
        sample) is held out; figures are measured there, ranges calibrated on the rest."""
        n = self.inputs.shape[0]
        held = max(1, n // 4)
        cal, ev = self.inputs[: n - held], self.inputs[n - held:]
        labels = None if self.labels is None else self.labels[n - held:]
        return _batches(cal, batch), _batches(ev, batch), labels


def _batches(x: Tensor, size: int) -> list[tuple]:
    return [(x[i:i + size],) for i in range(0, x.shape[0], size)]


def _check(x: Tensor, shape: Sequence[int], source: str) -> Tensor:
    if not x.is_floating_point():
        x = x.to(torch.float32)
    if x.dim() != len(shape) or tuple(x.shape[1:2]) != tuple(shape[1:2]):
        raise CalibrationError(f"calibration inputs from {source} have shape {tuple(x.shape)}, but the model takes "
                               f"{tuple(shape)} (N first, {shape[1] if len(shape) > 1 else '?'} channels)",
                               hint="pass inputs of the model's layout, or --input-shape")
    if not bool(torch.isfinite(x).all()):
        raise CalibrationError(f"calibration inputs from {source} hold NaN or Inf values")
    return x.to(torch.float32).contiguous()


def _limit(x: Tensor, labels: Tensor | None, n: int, source: str) -> tuple[Tensor, Tensor | None]:
    if x.shape[0] < 2:
        raise CalibrationError(f"{source} holds {x.shape[0]} sample(s); calibration needs at least 2 "
                               "(a quarter is held out to measure)")
    return x[:n], None if labels is None else labels[:n]


def random_inputs(shape: Sequence[int], n: int, seed: int) -> Calibration:
    x = torch.randn(n, *shape[1:], generator=torch.Generator().manual_seed(seed))
    return Calibration(x, None, "random", "random N(0,1) inputs: figures are indicative; real data "
                                          "(--calib) gives the ranges a deployment sees")


def from_array_file(path: Path, shape: Sequence[int], n: int) -> Calibration:
    import numpy as np

    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        why = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "pickled" in why:  # numpy's word for anything that is not an array file
            why = "not a numpy array file (.npy/.npz of numbers; pickled objects are never loaded)"
        raise CalibrationError(f"cannot read calibration file {path}: {why}") from None
    labels = None
    if isinstance(data, np.ndarray):
        array = data
    else:
        with data:
            names = list(data.files)
            if not names:
                raise CalibrationError(f"calibration file {path} holds no array")
            key = next((k for k in ("inputs", "images", "x") if k in names), names[0])
            array = data[key]
            if "labels" in names:
                labels = torch.from_numpy(np.asarray(data["labels"])).long()
    if array.dtype.kind not in "fiu":
        raise CalibrationError(f"calibration file {path} holds {array.dtype} values, not numbers")
    x = _check(torch.from_numpy(np.ascontiguousarray(array)), shape, str(path))
    if labels is not None and labels.shape[0] != x.shape[0]:
        labels = None
    x, labels = _limit(x, labels, n, str(path))
    return Calibration(x, labels, str(path))


def normalisation(spec, channels: int, mean: Sequence[float] | None, std: Sequence[float] | None,
                  model=None) -> tuple[tuple, tuple, str]:
    """(mean, std, where they came from) for images scaled to [0, 1]."""
    if mean is not None or std is not None:
        m = tuple(mean or (0.0,) * channels)
        s = tuple(std or (1.0,) * channels)
        return m, s, "--mean/--std"
    builder = getattr(spec, "builder", "") or ""
    if builder.startswith("timm") and model is not None:
        try:
            from timm.data import resolve_data_config

            cfg = resolve_data_config({}, model=model)
            return tuple(cfg["mean"]), tuple(cfg["std"]), "timm's data config"
        except Exception:
            pass
    if "ultralytics" in builder:
        return (0.0,) * channels, (1.0,) * channels, "none (ultralytics takes [0, 1])"
    if channels == 3:
        return IMAGENET[0], IMAGENET[1], "ImageNet mean/std"
    return (0.0,) * channels, (1.0,) * channels, "none"


def from_images(folder: Path, shape: Sequence[int], n: int, mean, std, spec=None, model=None) -> Calibration:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise CalibrationError("--calib DIR decodes images with Pillow, which is not installed",
                               hint="pip install pillow") from None
    if len(shape) != 4:
        raise CalibrationError(f"--calib DIR needs a model taking images (N, C, H, W), not {tuple(shape)}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise CalibrationError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in calibration folder {folder}")
    _, c, h, w = shape
    if c not in (1, 3):
        raise CalibrationError(f"--calib DIR makes 1- or 3-channel images, the model takes {c} channels")
    m, s, where = normalisation(spec, c, mean, std, model)
    if len(m) != c or len(s) != c or any(v == 0 for v in s):
        raise CalibrationError(f"--mean/--std need {c} values each (std non-zero)")
    samples = []
    for path in files[:n]:
        try:
            with Image.open(path) as im:
                im = im.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
                t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(h, w, c)
        except (UnidentifiedImageError, OSError) as exc:
            raise CalibrationError(f"cannot decode calibration image {path}: {str(exc).splitlines()[0]}") from None
        x = t.permute(2, 0, 1).to(torch.float32) / 255.0
        samples.append((x - torch.tensor(m).reshape(c, 1, 1)) / torch.tensor(s).reshape(c, 1, 1))
    x, _ = _limit(torch.stack(samples), None, n, str(folder))
    return Calibration(x, None, str(folder), f"{len(x)} images resized to {h}x{w}, normalised: {where}")


def from_hook(spec, shape: Sequence[int], n: int) -> Calibration | None:
    """A Python spec's `calibration_inputs(n, shape)`, or None when the spec has none."""
    builder = getattr(spec, "builder", "") or ""
    file, _, _ = builder.rpartition(":")
    if not file.endswith(".py"):
        return None

    fn = getattr(_import_file(Path(file)), "calibration_inputs", None)
    if not callable(fn):
        return None
    try:
        value = fn(n, tuple(shape))
    except Exception as exc:
        raise CalibrationError(f"the spec's calibration_inputs() failed: {type(exc).__name__}: "
                               f"{(str(exc).splitlines() or [''])[0]}") from None
    labels = None
    if isinstance(value, (tuple, list)) and len(value) == 2:
        value, labels = value
    if not isinstance(value, Tensor):
        raise CalibrationError(f"the spec's calibration_inputs() returned {type(value).__name__}, not a tensor "
                               "(N, ...) or (tensor, labels)")
    x = _check(value, shape, "the spec's calibration_inputs()")
    labels = torch.as_tensor(labels).long() if labels is not None else None
    x, labels = _limit(x, labels, n, "the spec's calibration_inputs()")
    return Calibration(x, labels, "calibration_inputs()")


def load_calibration(source: str | Path | None, shape: Sequence[int], n: int, *, seed: int = 0, spec=None,
                     model=None, mean=None, std=None) -> Calibration:
    """The calibration samples (at most `n`) from `source` (see the module doc); `shape` is the
    model's input shape (N first)."""
    if n < 2:
        raise CalibrationError(f"--calib-samples {n}: at least 2 are needed (a quarter is held out to measure)")
    if source is None:
        hooked = from_hook(spec, shape, n) if spec is not None else None
        return hooked or random_inputs(shape, n, seed)
    path = Path(source)
    if not path.exists():
        raise CalibrationError(f"calibration input not found: {path}")
    if path.is_dir():
        return from_images(path, shape, n, mean, std, spec, model)
    if path.suffix.lower() in (".npz", ".npy"):
        return from_array_file(path, shape, n)
    raise CalibrationError(f"calibration input {path} is neither a folder of images nor a .npz/.npy file")
