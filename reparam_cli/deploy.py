"""Reading deploy files back: reparam's safetensors metadata, rebuilding a deploy model from a
safetensors file (`load_deploy`), and TorchScript / pt2 / ONNX files as callable modules, plus the
comparison of an exported file with the deploy model it was written from (`compare_exported`).

Writing lives in `export.py`.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import CheckpointError, OutputError
from .export import RUNTIME, _first_line
from .metadata import decode_metadata


def read_metadata(path: str | Path) -> dict[str, object]:
    """reparam's metadata from a safetensors deploy file (JSON values decoded)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from None
    return decode_metadata(raw)


def stored_spec(meta: dict[str, object], *, trust: bool = False):
    """The ModelSpec a deploy file was converted with, from its decoded metadata (None if absent).

    The stored spec is data: it is parsed, never imported, and returned only when rebuilding it
    runs nothing but reparam's own or an integrated library's builders (`spec.SAFE_SPEC_KINDS`);
    any other builder raises SpecError unless `trust` (--trust-spec) is set.
    """
    from .spec import check_stored_spec

    return None if meta.get("spec") is None else check_stored_spec(stored_spec_data(meta), trust)


def stored_spec_data(meta: dict[str, object]):
    """The stored ModelSpec, parsed but not checked: for its name and figures only, never to build."""
    from .spec import ModelSpec

    stored = meta["spec"]
    return ModelSpec.from_json(stored if isinstance(stored, str) else json.dumps(stored))


def conversion_options(linear_as_conv: bool = False, graph: bool = True) -> dict:
    """Keyword options for `reparameterize` beyond the recipes, as stored in every deploy file
    (`linear_as_conv` only when set)."""
    options: dict = {"linear_as_conv": True} if linear_as_conv else {}
    options["graph"] = graph
    return options


def deploy_file_options(path: str | Path) -> dict:
    """The conversion options a reparam safetensors deploy file was written with ({} if none)."""
    if deploy_format_of(path) != "safetensors":
        return {}
    options = read_metadata(path).get("options")
    if not isinstance(options, dict):
        options = {}
    # Files written before the graph pass existed store no `graph` option: their skeleton has none.
    return conversion_options(bool(options.get("linear_as_conv")), options.get("graph", False) is True)


def load_deploy(path: str | Path, spec=None, *, trust_spec: bool = False) -> nn.Module:
    """Rebuild a runnable deploy model from a reparam safetensors file.

    The spec stored in the file is used unless `spec` (a ModelSpec or a --spec reference) is given.
    A torch pickle holding a plain state dict of the fused model (a reference layout) needs `spec`
    (see `load_deploy_state_dict`).
    A stored spec is rebuilt only when it names a built-in or timm builder with plain arguments;
    one naming other code (a module:function, a .py file) raises SpecError unless `trust_spec`.
    The training model is built on the meta device and converted shape-only, then the file's
    tensors are assigned to the resulting skeleton. Non-persistent buffers, which the file does
    not hold, are computed as the model's constructor computes them (`ModelSpec.build_meta`).
    """
    from safetensors.torch import load_file

    from .checkpoint import load_into
    from .engine import reparameterize
    from .spec import load_spec

    if isinstance(spec, str):
        spec = load_spec(spec)
    if deploy_format_of(path) == "state_dict":
        return load_deploy_state_dict(path, spec)
    if spec is None:
        spec = stored_spec(read_metadata(path), trust=trust_spec)
        if spec is None:
            raise CheckpointError(f"{path} carries no reparam spec metadata", hint="pass --spec to rebuild it")
    skeleton, _ = reparameterize(spec.build_meta().eval(), **deploy_file_options(path))
    return load_into(skeleton, load_file(str(path)), what="deploy file").eval()


class OnnxModule(nn.Module):
    """An ONNX deploy file run by onnxruntime (CPU), callable like the deploy nn.Module.

    It holds no parameters; a zero-size buffer carries the model's input dtype (for tolerances),
    and `num_parameters` counts the floating initializers (the weights).
    """

    def __init__(self, path: str | Path):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            from .extras import install_hint

            raise CheckpointError("reading ONNX files needs onnxruntime, which is not installed",
                                  hint=install_hint("onnx")) from None
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise CheckpointError(f"cannot load {path} with onnxruntime: {_first_line(exc)}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        onnx_type = self.session.get_inputs()[0].type
        dtype = {"tensor(float16)": torch.float16, "tensor(double)": torch.float64,
                 "tensor(bfloat16)": torch.bfloat16}.get(onnx_type, torch.float32)
        self.register_buffer("dtype_marker", torch.zeros(0, dtype=dtype), persistent=False)
        self.num_parameters = _onnx_weight_count(path)

    def forward(self, *xs: Tensor) -> Tensor:
        """The first output for positional tensor inputs (fed to the file's inputs in order)."""
        feed = {name: (x.detach().to(self.dtype_marker.dtype) if x.is_floating_point() else x).cpu().contiguous().numpy()
                for name, x in zip(self.input_names, xs)}
        return torch.from_numpy(self.session.run(None, feed)[0])


def _onnx_weight_count(path: str | Path) -> int:
    try:
        import onnx
        from onnx import TensorProto

        floating = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
        graph = onnx.load(str(path), load_external_data=False).graph
        total = 0
        for init in graph.initializer:
            if init.data_type in floating:
                n = 1
                for d in init.dims:
                    n *= d
                total += n
        return total
    except Exception:  # figures only: never fail verification over them
        return 0


class ExportedProgramModule(nn.Module):
    """A loaded torch.export program as a module; `eval()`/`train()` do nothing (the program was
    exported in eval mode, and its GraphModule refuses mode switches)."""

    def __init__(self, graph_module: nn.Module):
        super().__init__()
        self.program = graph_module
        self.training = False

    def train(self, mode: bool = True) -> "ExportedProgramModule":
        return self

    def forward(self, *args: Tensor):
        return self.program(*args)


def deploy_format_of(path: str | Path) -> str:
    """The deploy format of a file, from its suffix and its contents: 'safetensors', 'onnx', 'pt2',
    'torchscript', or 'state_dict' (a plain torch.save pickle: a state dict in a reference layout)."""
    from .checkpoint import _looks_like_safetensors, sniff_deploy_format

    path = Path(path)
    # By content too: a file being written is checked under a name without suffix (/proc/self/fd/N).
    if path.suffix == ".safetensors" or (path.is_file() and _looks_like_safetensors(path)):
        return "safetensors"
    if path.suffix == ".onnx":
        return "onnx"
    found = sniff_deploy_format(path)
    if found:
        return found
    if path.suffix == ".pt2":
        return "pt2"
    return "state_dict" if _is_torch_pickle(path) else "torchscript"


def _is_torch_pickle(path: Path) -> bool:
    """A torch.save file (zip or legacy pickle) that is not TorchScript / pt2 (checked before)."""
    from .pipes import sniff_format

    try:
        with open(path, "rb") as f:
            head = f.read(16)
        return sniff_format(head) == "torch"
    except (OSError, CheckpointError):
        return False


def deploy_skeleton(spec, state: dict | None = None) -> nn.Module:
    """The spec's deploy model on the meta device (shapes only): reparameterize(spec.build('meta')).

    A plain state dict carries no record of how it was fused: with `state`, the skeleton with the
    graph pass is used when the state fits it, else the one without (a reference implementation's
    layout keeps the conv+BN pairs outside its re-parameterized blocks)."""
    from .checkpoint import fit_problems
    from .engine import reparameterize

    skeleton = reparameterize(spec.build_meta().eval())[0]
    if state is not None and fit_problems(skeleton, state):
        plain = reparameterize(spec.build_meta().eval(), graph=False)[0]
        if not fit_problems(plain, state):
            return plain
    return skeleton


def load_deploy_state_dict(path: str | Path, spec) -> nn.Module:
    """A deploy model from a plain state dict of the fused model (`.pth`, `.pth.tar`): what a reference
    implementation's convert script or timm's reparameterize + torch.save writes.

    The file is read with weights_only (wrappers such as `state_dict` and `module.` prefixes are
    unwrapped as for training checkpoints) and loaded strictly into the spec's deploy skeleton.
    """
    from .checkpoint import extract_checkpoint, fit_problems, load_into, read_raw
    from .spec import load_spec

    if isinstance(spec, str):
        spec = load_spec(spec)
    if spec is None:
        raise CheckpointError(f"{path} is a plain state dict without reparam metadata",
                              hint="pass --spec (spec=...) naming the architecture it was fused from")
    expected = deploy_skeleton(spec).state_dict().keys()
    state = extract_checkpoint(read_raw(path), expected=expected, source=str(path)).state
    skeleton = deploy_skeleton(spec, state)
    if fit_problems(skeleton, state) and not fit_problems(spec.build(device="meta"), state):
        raise CheckpointError(f"{path} is a training checkpoint of {spec.name}, not a deploy file",
                              hint="convert it with `reparam convert`, or pass its deploy file")
    return load_into(skeleton, state, what="deploy state dict").eval()


def is_deploy_state(spec, state, training: nn.Module | None = None) -> bool:
    """Whether a state dict's keys and shapes fit the spec's deploy skeleton (and not its training
    model: `training`, the spec's model on meta when the caller has it built already)."""
    from .checkpoint import fit_problems

    training = spec.build(device="meta") if training is None else training
    return bool(fit_problems(training, state)) and not fit_problems(deploy_skeleton(spec, state), state)


def load_exported(path: str | Path, fmt: str) -> nn.Module:
    """A TorchScript, pt2 or ONNX deploy file as a callable module (in eval mode)."""
    path = Path(path)
    if fmt == "onnx":
        return OnnxModule(path).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "pt2":
            logged: list[str] = []
            try:
                with _torch_logs_kept(logged):  # torch logs a whole traceback before raising
                    return ExportedProgramModule(torch.export.load(str(path)).module())
            except Exception as exc:
                detail = _last_logged_error(logged) or _first_line(exc)
                raise CheckpointError(f"cannot read {path} as a torch.export (.pt2) file: {detail}") from None
        try:
            return torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as exc:
            raise CheckpointError(f"cannot read {path} as a TorchScript file: {_first_line(exc)}") from None


@contextlib.contextmanager
def _torch_logs_kept(into: list[str], name: str = "torch.export"):
    """Collect what torch's `name` logger says meanwhile into `into` instead of printing it."""
    import logging

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            into.append(record.getMessage() + ("\n" + self.formatException(record.exc_info) if record.exc_info else ""))

        def formatException(self, exc_info) -> str:
            return logging.Formatter().formatException(exc_info)

    logger = logging.getLogger(name)
    handlers, propagate = logger.handlers, logger.propagate  # torch attaches its own handlers here
    logger.handlers, logger.propagate = [Keep()], False
    try:
        yield
    finally:
        logger.handlers, logger.propagate = handlers, propagate


def _last_logged_error(logged: list[str]) -> str:
    """The exception line that ends a logged traceback, first sentence only ('' if none)."""
    lines = [line.strip() for text in logged for line in text.splitlines() if line.strip()]
    last = next((line for line in reversed(lines) if "Error" in line.split(":")[0]), "")
    return last.split(". ")[0]


def load_deployed_any(path: str | Path, spec=None) -> nn.Module:
    """A deploy model from a safetensors file written by reparam, a plain deploy state dict (with a
    spec), or a TorchScript, pt2 or ONNX file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"deploy file not found: {path}")
    fmt = deploy_format_of(path)
    if fmt in ("safetensors", "state_dict"):
        return load_deploy(path, spec)
    return load_exported(path, fmt)


def compare_exported(path: str | Path, fmt: str, deploy: nn.Module, x: Tensor | tuple,
                     rtol: float, atol: float) -> dict[str, object]:
    """Run an exported file with its own runtime on `x` (a tensor or a tuple of arguments, in the
    file's dtype) and compare its first output with the deploy module's.

    Returns {"runtime", "max_abs_err", "max_rel_err", "ok"} (errors NaN and not ok when either output
    holds NaN/Inf; "nonfinite" then says where): ok when max |exported - deploy| <= atol + rtol * max|deploy|.
    The deploy module runs as verification runs it (float32 for float16/bfloat16 weights).
    """
    from .verification import _first_tensor, compare_outputs, run_model

    args = x if isinstance(x, tuple) else (x,)
    if fmt == "onnx" and any(a.dtype == torch.bfloat16 for a in args):
        raise OutputError("onnxruntime cannot run bfloat16 convolutions on CPU, so the ONNX file cannot be verified",
                          hint="use --dtype float16 or float32, or --no-verify")
    exported = load_exported(path, fmt)
    with torch.no_grad():
        expected = _first_tensor(run_model(deploy, (args, {}), "the deploy model"))
        try:
            got = _first_tensor(exported(*args))
        except Exception as exc:
            raise OutputError(f"the exported {fmt} file fails to run in {RUNTIME[fmt]}: {_first_line(exc)}") from None
    if got.shape != expected.shape:
        raise OutputError(f"the exported {fmt} file gives output shape {tuple(got.shape)}, "
                          f"the deploy model {tuple(expected.shape)}")
    c = compare_outputs(got, expected, rtol, atol, f"exported {fmt} file")
    figures = {"runtime": RUNTIME[fmt], "max_abs_err": c.max_abs_err, "max_rel_err": c.max_rel_err, "ok": c.ok}
    if c.nonfinite:
        figures["nonfinite"] = c.nonfinite
    return figures
