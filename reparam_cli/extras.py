"""Optional extras (onnx, timm, plot): whether they are installed, and an install command that works.

Torch-free, so the CLI can report a missing extra before any conversion work starts. reparam is
not on a package index: the hint names the extra's own packages, and the editable install of the
clone reparam runs from when there is one.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from reparam_cli.errors import ReparamError

# extra -> the modules it provides (pip package names are the same).
EXTRAS: dict[str, tuple[str, ...]] = {
    "onnx": ("onnx", "onnxruntime", "onnxscript"),
    "timm": ("timm",),
    "plot": ("matplotlib",),
    "ultralytics": ("ultralytics",),
    "mmpretrain": ("mmpretrain", "mmengine", "mmcv"),
    "torchvision": ("torchvision",),
    "transformers": ("transformers",),
}


class MissingExtra(ReparamError):
    """An optional dependency a requested feature needs is not installed."""


def missing_modules(extra: str) -> list[str]:
    """The modules of `extra` that cannot be imported (found without importing them)."""
    return [m for m in EXTRAS[extra] if not _importable(m)]


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken install, or a module without a spec
        return False


def install_hint(extra: str) -> str:
    """A pip command that installs `extra`: its packages, or the editable clone with the extra."""
    packages = {"mmcv": "mmcv-lite"}  # module -> pip package, where they differ
    hint = f"pip install {' '.join(packages.get(m, m) for m in EXTRAS[extra])}"
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file():
        hint += f", or pip install -e '{root}[{extra}]'"
    return hint


def import_extra(module: str, extra: str, feature: str, error: type[ReparamError] = MissingExtra):
    """`module` imported (e.g. "timm", "onnxruntime.quantization"), or `error` (a ReparamError class)
    saying that `feature` needs `extra`, with the pip command that installs it. The one place that
    turns a missing optional dependency into a message."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise error(f"{feature} needs the {extra} package, which cannot be imported ({exc})",
                    hint=install_hint(extra)) from None


def require_extra(extra: str, feature: str) -> None:
    """Raise MissingExtra when `feature` (e.g. "--format onnx") cannot run for lack of `extra`."""
    missing = missing_modules(extra)
    if missing:
        raise MissingExtra(f"{feature} needs the {extra} extra ({', '.join(missing)} not installed)",
                           hint=install_hint(extra))
