"""Cross-layer equalization of a deploy model (Nagel et al., ICCV 2019), exact by construction.

The model (or each of its traceable submodules) is traced with torch.fx; a *pair* is a conv or
linear layer whose output reaches exactly one other conv/linear layer through a chain of
per-channel, positively homogeneous operations, each with a single user:

    ReLU, LeakyReLU, PReLU (f(x / s) = f(x) / s for s > 0), Identity, Dropout,
    max / average pooling, flatten of a (N, C, 1, 1) tensor (after global pooling)

Anything else between two layers (SiLU, Hardswish, an addition, a fan-out, a concat) breaks the
chain, and the report says which operation did. Each pair is rescaled with `algebra.equalize_pair`;
pairs sharing a layer are swept repeatedly (the paper's iteration) until the scales settle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from reparam_cli.core import algebra as A

HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d,
                       nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                       nn.AdaptiveMaxPool2d)
HOMOGENEOUS_FUNCTIONS = {F.relu, torch.relu, F.leaky_relu, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                         F.dropout}
LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class Pair:
    """Two layers (module paths) equalized across the operations between them."""

    first: str
    second: str
    through: list[str]


@dataclass
class EqualizeReport:
    pairs: list[Pair] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"layer": path, "reason": ...}
    sweeps: int = 0

    def as_dict(self) -> dict:
        return {"pairs": [{"first": p.first, "second": p.second, "through": p.through} for p in self.pairs],
                "skipped": self.skipped, "sweeps": self.sweeps}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _trace(module: nn.Module) -> fx.Graph | None:
    try:
        return fx.Tracer().trace(module)
    except Exception:
        return None


def _input_shape(node: fx.Node) -> tuple | None:
    arg = node.args[0] if node.args else None
    return arg.meta.get("shape") if isinstance(arg, fx.Node) else None


def _pooled(node: fx.Node, start: int | None = None) -> bool:
    """A flatten from dim 1 (`start`, else read off the call) of an (N, C, 1, ...) tensor keeps
    channel c at position c."""
    shape = _input_shape(node)
    if start is None:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    return shape is not None and len(shape) >= 2 and math.prod(shape[2:]) == 1 and start == 1


def _shape_text(node: fx.Node) -> str:
    shape = _input_shape(node)
    return "x".join(map(str, shape)) if shape else "unknown"


def _node_name(node: fx.Node, module: nn.Module, prefix: str = "") -> tuple[bool, str]:
    """(whether `node` commutes with a positive per-channel scale, its description)."""
    if node.op == "call_module":
        sub = module.get_submodule(node.target)
        name = f"{_join(prefix, node.target)} ({type(sub).__name__})"
        if isinstance(sub, nn.Flatten):
            return _pooled(node, sub.start_dim), f"{name} (of a {_shape_text(node)} tensor)"
        return isinstance(sub, HOMOGENEOUS_MODULES), name
    if node.op == "call_function":
        fn = node.target
        name = getattr(fn, "__name__", str(fn))
        if fn in HOMOGENEOUS_FUNCTIONS:
            return True, name
        if fn is torch.flatten:
            return _pooled(node), f"{name} (of a {_shape_text(node)} tensor)"
        return False, name
    if node.op == "call_method":
        if node.target in ("relu", "relu_"):
            return True, node.target
        if node.target == "flatten":
            return _pooled(node), f"flatten (of a {_shape_text(node)} tensor)"
        return False, str(node.target)
    return False, node.op


def _shapes(module: nn.Module, graph: fx.Graph, example) -> None:
    """Record each node's output shape in node.meta['shape'] (for flatten): a run on `example`."""
    gm = fx.GraphModule(module, graph)

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                n.meta["shape"] = tuple(out.shape)
            return out

    Recorder(gm).run(*example)


def find_pairs(model: nn.Module, example: tuple) -> tuple[list[Pair], list[dict]]:
    """The equalizable pairs of `model` and, for each layer whose output could not be paired, why.

    `example`: positional inputs of one forward pass (shapes of flattened tensors are read off it).
    Untraceable modules are searched child by child; their own layers are skipped with the reason.
    """
    pairs: list[Pair] = []
    skipped: list[dict] = []
    inputs: dict[int, tuple] = {}

    def capture(m, args):
        inputs.setdefault(id(m), tuple(a.detach() for a in args if isinstance(a, torch.Tensor)))

    handles = [m.register_forward_pre_hook(capture) for m in model.modules()]
    try:
        with torch.no_grad():
            model(*example)
    finally:
        for h in handles:
            h.remove()

    def visit(prefix: str, module: nn.Module) -> None:
        if isinstance(module, LAYERS):
            return
        graph = _trace(module)
        if graph is None or id(module) not in inputs:
            for name, child in module.named_children():
                visit(_join(prefix, name), child)
            return
        try:
            _shapes(module, graph, inputs[id(module)])
        except Exception:
            pass  # shapes only serve flatten; without them a flatten breaks the chain
        for node in graph.nodes:
            if node.op != "call_module" or not isinstance(module.get_submodule(node.target), LAYERS):
                continue
            path, through, cur = _join(prefix, node.target), [], node
            while True:
                users = list(cur.users)
                if len(users) != 1:
                    skipped.append({"layer": path, "reason": "its output is used by several operations"
                                    if users else "no following conv/linear layer"})
                    break
                nxt = users[0]
                if nxt.op == "output":
                    skipped.append({"layer": path, "reason": "its output is the model's (or the traced module's) output"})
                    break
                if nxt.op == "call_module" and isinstance(module.get_submodule(nxt.target), LAYERS):
                    pairs.append(Pair(path, _join(prefix, nxt.target), through))
                    break
                ok, name = _node_name(nxt, module, prefix)
                if not ok:
                    skipped.append({"layer": path, "reason": f"followed by {name}, which is not positively homogeneous "
                                    "per channel"})
                    break
                through.append(name)
                cur = nxt

    visit("", model)
    return pairs, skipped


def _set(model: nn.Module, path: str, k: A.Kernel) -> None:
    layer = model.get_submodule(path)
    with torch.no_grad():
        layer.weight.copy_(k.weight.reshape(layer.weight.shape))
        if layer.bias is not None:
            layer.bias.copy_(k.bias)


def _kernel(model: nn.Module, path: str) -> A.Kernel:
    layer = model.get_submodule(path)
    if isinstance(layer, nn.Linear):
        return A.Kernel(layer.weight.detach(), None if layer.bias is None else layer.bias.detach())
    return A.Kernel(layer.weight.detach(), None if layer.bias is None else layer.bias.detach(),
                    tuple(layer.stride), (0,) * (layer.weight.dim() - 2), tuple(layer.dilation), layer.groups)


def equalize(model: nn.Module, example: tuple, *, max_sweeps: int = 100, tol: float = 1e-4) -> EqualizeReport:
    """Equalize `model` in place (see the module doc); the function it computes is unchanged up to
    float rounding. Layers paired with a conv whose channels do not line up are skipped.

    Each sweep applies `algebra.equalize_pair` to every pair in model order, in float64; sweeps
    repeat until no scale differs from 1 by more than `tol` (at most `max_sweeps`).
    """
    pairs, skipped = find_pairs(model, example)
    report = EqualizeReport(skipped=skipped)
    usable = []
    for p in pairs:
        k1, k2 = _kernel(model, p.first), _kernel(model, p.second)
        if k1.out_channels != k2.in_channels:
            report.skipped.append({"layer": p.first, "reason": f"{p.second} reads {k2.in_channels} channels, not "
                                   f"its {k1.out_channels}"})
            continue
        usable.append(p)
    report.pairs = usable
    for sweep in range(max_sweeps):
        report.sweeps = sweep + 1
        worst = 0.0
        for p in usable:
            k1, k2 = _kernel(model, p.first), _kernel(model, p.second)
            n1, n2, s = A.equalize_pair(k1, k2)
            _set(model, p.first, n1)
            _set(model, p.second, n2)
            worst = max(worst, float((s - 1).abs().max()) if s.numel() else 0.0)
        if worst <= tol:
            break
    return report
