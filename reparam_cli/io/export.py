"""Writing deploy models, atomically (reading them back: `runtimes.py`; safetensors: `safetensors.py`).

Formats: `safetensors` (state dict + reparam metadata; rebuilt with the spec), `torchscript`
(traced, runs without reparam), `pt2` (`torch.export`, loadable with `torch.export.load`) and
`onnx` (exported with torch's dynamo exporter, run with onnxruntime). pt2 and ONNX files get a
dynamic batch and dynamic height/width where the model allows it (`dynamic`: auto, batch, none).

Every writer goes through `atomic_output` (`safeio.py`): the file is written unnamed (O_TMPFILE,
or a hidden temporary) beside the target and given its name only when complete, so a crash, a
signal, SIGKILL or a failed verification never leaves a half-written output; without `overwrite`
an existing output is never replaced, not even by a concurrent run. Writers take a `check` callback
that runs on the finished temporary file before it is published (the pipeline loads the file back
with its runtime there and compares it with the deploy model; raising aborts the write). torch's
TorchScript and pt2 writers write through a `GuardedWriter`, so a full disk is one OutputError
rather than a C++ abort.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from reparam_cli.core.messages import describe, quiet_logger
from reparam_cli.errors import OutputError
from reparam_cli.extras import import_extra
from reparam_cli.io.formats import DTYPE_NAMES, DYNAMIC_SHAPES
from reparam_cli.io.safeio import atomic_output, guarded_writer, write_error
from reparam_cli.io.safetensors import Check

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # --dtype


def _as_args(example: Tensor | tuple) -> tuple:
    """An example input (one tensor, or a tuple of positional arguments) as a tuple of arguments."""
    return example if isinstance(example, tuple) else (example,)


def write_torchscript(path: str | Path, model: nn.Module, example: Tensor | tuple, check: Check | None = None, *,
                      overwrite: bool = False) -> None:
    """Trace the deploy model on `example` (a tensor or a tuple of arguments) and save a
    self-contained TorchScript file."""
    model = model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript deprecation notices
        try:
            scripted = torch.jit.trace(model, example, check_trace=False)
        except Exception as exc:
            raise OutputError(f"TorchScript tracing failed: {describe(exc)}") from None
        with atomic_output(path, overwrite) as tmp:
            with guarded_writer(tmp) as f:
                torch.jit.save(scripted, f)
            if check is not None:
                check(tmp)


def _batched(example: Tensor) -> Tensor:
    """Export with a batch of at least 2: torch.export specialises a size-1 dimension to a constant."""
    return example if example.shape[0] > 1 else example.expand(2, *example.shape[1:]).contiguous()


# --dynamic-shapes: `auto` tries a dynamic batch and dynamic spatial dims (H, W), then the batch
# alone, then static shapes; `batch` starts at the batch alone; `none` exports static shapes.
_SPATIAL_NAMES = {3: ("length",), 4: ("height", "width"), 5: ("depth", "height", "width")}


def dim_names(ndim: int) -> dict[int, str]:
    """Names of an input's dims that may be dynamic: {0: 'batch', 2: 'height', 3: 'width'} for NCHW."""
    spatial = _SPATIAL_NAMES.get(ndim, tuple(f"dim{d}" for d in range(2, ndim)))
    return {0: "batch", **{2 + i: name for i, name in enumerate(spatial)}}


def _shape_attempts(x: Tensor, dynamic: str) -> list[dict | None]:
    """The dynamic_shapes to try for one input, most dynamic first (None: static)."""
    if dynamic not in DYNAMIC_SHAPES:
        raise OutputError(f"unknown --dynamic-shapes {dynamic!r}", hint=f"choose one of {', '.join(DYNAMIC_SHAPES)}")
    batch = {0: torch.export.Dim("batch", min=1, max=65536)} if x.dim() >= 1 else {}
    # Spatial dims get Dim.AUTO: torch.export keeps them symbolic where the model allows, and the
    # probe below tells whether guards (a flatten into a fixed Linear, ...) still pin them.
    spatial = {d: torch.export.Dim.AUTO for d in range(2, x.dim())}
    attempts: list[dict | None] = []
    if dynamic == "auto" and batch and spatial:
        attempts.append({**batch, **spatial})
    if dynamic in ("auto", "batch") and batch:
        attempts.append(batch)
    return attempts + [None]


def _symbolic_dims(program, x: Tensor) -> list[int]:
    """The dims of the program's (single) user input that stayed symbolic."""
    name = program.graph_signature.user_inputs[0]
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == name)
    shape = node.meta["val"].shape
    return [d for d in range(x.dim()) if not isinstance(shape[d], int)]


def _runs_at_other_sizes(program, x: Tensor, dims: list[int]) -> bool:
    """Does the exported program run at a batch of 1 and 32 more pixels along each dynamic spatial dim?
    (32 keeps the divisibility strided networks need.)"""
    probe = list(x.shape)
    for d in dims:
        probe[d] = 1 if d == 0 else probe[d] + 32
    try:
        program.module()(torch.randn(*probe, dtype=x.dtype))
        return True
    except Exception:
        return False


def _export_program(model: nn.Module, example: Tensor | tuple, dynamic: str = "auto"):
    """torch.export the model: (program, example arguments used, names of the dynamic dims).

    With one tensor input, the dims `dynamic` asks for are made dynamic where the model allows it
    (each candidate is exported, then run at other sizes; the first that works is kept), falling
    back to static shapes. Several inputs are exported with static shapes."""
    args = _as_args(example)
    single = len(args) == 1 and isinstance(args[0], Tensor) and args[0].dim() >= 1
    attempts = _shape_attempts(args[0], dynamic) if single else [None]
    error: BaseException | None = None
    for shapes in attempts:
        x_args = (_batched(args[0]),) if shapes else args
        try:
            program = torch.export.export(model, x_args, dynamic_shapes=(shapes,) if shapes else None)
        except Exception as exc:  # e.g. a reshape with a hard-coded batch size: try fewer dynamic dims
            error = exc
            continue
        dims = _symbolic_dims(program, x_args[0]) if shapes else []
        if dims and not _runs_at_other_sizes(program, x_args[0], dims):
            continue
        names = dim_names(x_args[0].dim()) if dims else {}
        return program, x_args, [names[d] for d in dims if d in names]
    raise OutputError(f"torch.export failed: {describe(error)}") from None


def write_pt2(path: str | Path, model: nn.Module, example: Tensor | tuple, check: Check | None = None,
              dynamic: str = "auto", *, overwrite: bool = False) -> list[str]:
    """Export the deploy model with torch.export and save it (load with `torch.export.load(path).module()`).
    Returns the names of the input dims that are dynamic (e.g. ['batch', 'height', 'width'])."""
    model = model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program, _, dims = _export_program(model, example, dynamic)
        with atomic_output(path, overwrite) as tmp:
            with guarded_writer(tmp) as f:
                torch.export.save(program, f)
            if check is not None:
                with quiet_logger("torch.export.pt2_archive._package"):  # the temporary has no .pt2 suffix: torch warns
                    check(tmp)
    return dims


def _require_onnx() -> None:
    for module in ("onnx", "onnxscript"):
        import_extra(module, "onnx", "ONNX export", OutputError)


def _add_metadata_props(path: Path, props: dict[str, str]) -> None:
    """Add `props` to an ONNX file's `metadata_props` (key -> string value), rewriting it in place."""
    import onnx

    model = onnx.load(str(path))
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    onnx.save(model, str(path))


def write_onnx(path: str | Path, model: nn.Module, example: Tensor | tuple, check: Check | None = None,
               dynamic: str = "auto", *, overwrite: bool = False,
               metadata: Callable[[list[str]], dict[str, str]] | None = None) -> list[str]:
    """Export the deploy model to a single self-contained ONNX file (input `input`, or `input0`,
    `input1`, ... for several; output `output`). The model is exported with torch.export first (the
    dynamic dims as for pt2), and that program converted; returns the names of the dynamic dims.
    `metadata(dynamic dims)` gives entries for the file's `metadata_props` (what a library's own
    runtime reads back, e.g. ultralytics' class names, stride and task), written before `check`."""
    _require_onnx()
    model = model.eval()
    args = _as_args(example)
    names = ["input"] if len(args) == 1 else [f"input{i}" for i in range(len(args))]
    with warnings.catch_warnings(), torch.no_grad(), atomic_output(path, overwrite) as tmp:
        warnings.simplefilter("ignore")
        try:
            program, x_args, dims = _export_program(model, example, dynamic)
            sources = [(program, x_args, dims), (model, args, [])]
        except OutputError:
            sources = [(model, args, [])]
        for source, x_args, dims in sources:  # the program, else the module with static shapes
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # keep stdout clean for --json
                    torch.onnx.export(source, x_args, str(tmp), dynamo=True, external_data=False,
                                      input_names=names, output_names=["output"], verbose=False)
                break
            except Exception as exc:
                error = exc
        else:
            raise OutputError(f"ONNX export failed: {describe(error)}") from None
        props = metadata(dims) if metadata is not None else None
        if props:
            _add_metadata_props(tmp, props)
        if check is not None:
            check(tmp)
    return dims


# What a save_pretrained folder holds: the only entries `--overwrite` replaces in an existing folder.
_PRETRAINED_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")


def _replaceable(entry: Path) -> bool:
    return entry.is_file() and (entry.name in _PRETRAINED_FILES or
                                (entry.name.startswith("model-") and entry.name.endswith(".safetensors")))


def check_folder_target(path: Path, overwrite: bool) -> None:
    """Raise OutputError unless `path` may become an output folder: new, or (with `overwrite`) a folder
    holding nothing but what save_pretrained writes."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise OutputError(f"output {path} exists and is not a folder", hint="-f hf writes a folder: name a new one with -o")
    if path.is_dir():
        if not overwrite:
            raise OutputError(f"output {path} already exists", hint="pass --overwrite to replace it")
        foreign = sorted(p.name for p in path.iterdir() if not _replaceable(p))
        if foreign:
            raise OutputError(f"output folder {path} holds {foreign[0]}, which save_pretrained does not write: "
                              "not replaced", hint="name a new folder with -o")
    if not path.parent.is_dir():
        raise OutputError(f"output folder does not exist: {path.parent}")


def write_folder(path: str | Path, fill: Callable[[Path], None], check: Check | None = None, *,
                 overwrite: bool = False) -> None:
    """Write an output folder atomically: `fill(tmp)` writes into a new hidden folder beside `path`,
    `check(tmp)` may refuse it (raising; nothing is published), then it is renamed to `path` (an
    existing save_pretrained folder is replaced only with `overwrite`, see check_folder_target)."""
    import os
    import shutil
    import tempfile

    path = Path(path)
    check_folder_target(path, overwrite)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.reparam-", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise write_error(exc, path) from None
    try:
        fill(tmp)
        if check is not None:
            check(tmp)
        try:
            if path.is_dir():  # --overwrite, checked above: the old folder goes once the new one is in place
                old = tmp.with_name(tmp.name + ".old")
                os.rename(path, old)
                os.rename(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, path)  # an empty folder created meanwhile would be replaced; any other refuses
        except OSError as exc:
            raise write_error(exc, path) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
