"""The engine: walk a module tree and replace every block that has a recipe by its deploy form.

`reparameterize(model)` returns a *new* module tree and a report; the model it is given and its
tensors are never modified. Containers along the way are shallow clones, so parameters of
untouched layers share storage with the input model (no copy): treat the result as a new model
over the same weights, and clone it if you intend to train both independently.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

import reparam_cli.blocks  # noqa: F401  (registers the built-in recipes)
from reparam_cli import ecosystems
from reparam_cli.blocks.linear_conv import linear_to_pointwise
from reparam_cli.blocks.registry import Declined, Fuse, Recipe, recipe_for
from reparam_cli.convert.graph import (KEPT, FusedRegion, RecordedInputs, Remaining, bn_kind, fold_recorded,
                                      fuse_graph, leftovers, unparametrized)
from reparam_cli.convert.native import FAMILY as NATIVE, fuses_natively, native_fuse, unchanged
from reparam_cli.core.shapeonly import on_meta, shape_only
from reparam_cli.core.tensors import all_finite, has_submodule, shallow_copy
from reparam_cli.errors import NotEquivalent, ReparamError


@dataclass
class ConvertedBlock:
    path: str
    block_type: str
    family: str


@dataclass
class ConversionReport:
    """What `reparameterize` did: each converted block with its path, and counts per block type;
    the linear regions the graph pass folded (`regions`) and what is left (`remaining`)."""

    converted: list[ConvertedBlock] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the caller should know (e.g. training mode)
    regions: list[FusedRegion] = field(default_factory=list)
    remaining: list[Remaining] = field(default_factory=list)
    kept: list[Remaining] = field(default_factory=list)  # BatchNorms kept on purpose (folding gains nothing)
    # Information, not left (see `_nothing_left_in`): untraceable modules holding nothing foldable,
    # native methods that already ran (a library's finish step).
    skipped: list[Remaining] = field(default_factory=list)
    # (layer path, BatchNorm path) folded on a recorded forward pass (`graph.fold_recorded`): a deploy
    # file stores them (FuseOptions.recorded) so that its skeleton replays exactly these folds.
    recorded: list[tuple[str, str]] = field(default_factory=list)
    # (module path, rank, channels) of recorded module inputs whose channel count a fold used
    # (`groups=x.shape[1]`): stored with the pairs (FuseOptions.inputs)
    inputs: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.remaining

    @property
    def changed(self) -> bool:
        return bool(self.converted or self.regions)

    @property
    def verify_blocks(self) -> list[tuple[str, str]]:
        """(path, type) of every converted block and graph-fused module, each path once, for verification."""
        seen: dict[str, str] = {b.path: b.block_type for b in self.converted}
        for r in self.regions:
            seen.setdefault(r.path, "graph")
        return list(seen.items())

    def summary(self) -> str:
        """'complete', or 'N left: ...' naming what is left (kinds counted, the first few paths)."""
        if not self.remaining:
            return "complete"
        kinds = Counter(r.kind for r in self.remaining)
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
        first = "; ".join(f"{r.path or '<root>'} ({r.kind}): {r.reason}" for r in self.remaining[:3])
        more = f"; ... {len(self.remaining) - 3} more" if len(self.remaining) > 3 else ""
        return f"{len(self.remaining)} left ({counts}): {first}{more}"

    @property
    def blocks(self) -> dict[str, int]:
        return dict(sorted(Counter(b.block_type for b in self.converted).items()))

    @property
    def paths(self) -> list[str]:
        return [b.path for b in self.converted]


def _fuse(recipe: Recipe, block: nn.Module, path: str) -> nn.Module:
    try:
        deployed = recipe.fuse(block)
    except NotEquivalent as exc:
        raise NotEquivalent(f"block {path or '<root>'} ({recipe.name}): {exc.message}", exc.hint) from None
    deployed.train(block.training)
    return deployed


def _floating(module: nn.Module) -> list[torch.Tensor]:
    return [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point() and not t.is_meta]


def _check_finite(block: nn.Module, deployed: nn.Module, path: str, name: str) -> None:
    """A fused block whose weights or biases are NaN/Inf while the block's own were finite computes
    something else (typically a fused scale overflowing the checkpoint's dtype): an error, verified or not."""

    if all(all_finite(t) for t in _floating(deployed)):
        return
    if all(all_finite(t) for t in _floating(block)):
        raise NotEquivalent(f"block {path or '<root>'} ({name}): fusing a finite checkpoint gives non-finite "
                            f"weights or biases (they overflow {_floating(deployed)[0].dtype})",
                            hint="convert in a wider dtype (e.g. a float32 checkpoint, --dtype float32)")


def _release(block: nn.Module, deployed: nn.Module) -> None:
    """Drop a converted training block's tensors so their memory is freed before the next block,
    except those of submodules its deploy form keeps (RepVGG's SE module, an activation)."""
    kept = {id(m) for m in deployed.modules()}
    for m in block.modules():
        if id(m) in kept:
            continue
        for store in (m._parameters, m._buffers):
            for name in store:
                store[name] = None


# What the graph pass says when it gave up on a module's code (an exception inside its trace).
_STOPPED = "the graph pass stopped here"


def _inside(path: str, where: str) -> bool:
    return not where or path == where or path.startswith(where + ".")


def _split_information(deployed: nn.Module, remaining: list[Remaining]) -> tuple[list[Remaining], list[Remaining]]:
    """(what is left, information) from the leftovers: left are BatchNorms, refusals and native
    methods not called; information are modules the graph pass could not trace (or stopped in)
    that hold nothing left to fold (no BatchNorm or uncalled native method inside them: every block
    in them was converted by its recipe or method), and native methods the library's own finish
    step already ran (ultralytics' Detect.fuse())."""
    foldable = [r.path for r in remaining if r.kind in ("batchnorm", "native-method")]
    left: list[Remaining] = []
    info: list[Remaining] = []
    for r in remaining:
        if r.kind == "native-method":
            ran = ecosystems.ran_natively(_module_at(deployed, r.path))
            if ran:
                info.append(Remaining(r.path, "native-method-ran", ran))
                foldable.remove(r.path)
                continue
        left.append(r)
    kept: list[Remaining] = []
    for r in left:
        opaque = r.kind == "untraceable" or (r.kind == "unfoldable" and r.reason.startswith(_STOPPED))
        if opaque and not any(_inside(p, r.path) for p in foldable):
            info.append(Remaining(r.path, r.kind, f"{r.reason} (nothing left to fold inside it)"))
        else:
            kept.append(r)
    return kept, info


def _module_at(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def reparameterize(
    model: nn.Module, *, native: bool = True, linear_as_conv: bool = False, consume: bool = False,
    graph: bool = True, recipes: Mapping[type, Fuse] | None = None, example_inputs=None,
    recorded: Sequence[Sequence[str]] | None = None, recorded_inputs: Sequence[Sequence] | None = None,
) -> tuple[nn.Module, ConversionReport]:
    """Return (deploy model, report): every module with a registered recipe replaced by its deploy form.

    Blocks are matched top-down: once a block is converted its children are not visited. Works on
    any device, including `meta` (shapes only), which builds a deploy skeleton without data.

    With `native` (default), blocks without a recipe that have their own `fuse()`,
    `reparameterize()` or `switch_to_deploy()` (timm, mmpretrain, ...) are converted by that
    method on a copy, reported with family "native" (rules in `reparam_cli.native`).

    linear_as_conv: also turn every plain nn.Linear outside converted blocks into an equivalent
    pointwise conv module (P9, `blocks.linear_conv.PointwiseLinear`), reported as block type "Linear".

    consume=True is the one exception to "the input is never modified": each training block's
    tensors are dropped as soon as it is fused, so peak memory stays near one copy of the weights.
    The training model is unusable afterwards (the pipeline uses this when it will not verify).

    Fusion folds BatchNorm's running statistics, i.e. the model's eval-mode function. A model (or
    any submodule) in training mode is converted all the same, but the deploy model is returned in
    eval mode, a UserWarning says so and `report.notes` records it: a deploy model in training mode
    would compute something else (dropout, the batch statistics of unfused BatchNorms).

    recipes: the caller's own recipes for this call, {BlockType: fuse} where `fuse(block)` returns
    the block's deploy form (composing `reparam_cli.core.algebra`); they take precedence over the
    registry and are reported with family "user". Nothing is registered.

    graph (default): then fold every exactly-foldable linear region left between the converted
    blocks (conv+BN, parallel branches, identities, ... of any network; `reparam_cli.convert.graph`),
    recorded in `report.regions`; converted blocks are never traced into. `report.remaining`
    lists what is left either way (BatchNorms, untraceable modules, refusals, native methods);
    `report.kept` what stays because folding it gains nothing (lone BatchNorms, folds the cost
    rules refuse). A fold that does not compute what its layers compute raises `graph.WrongFold`.

    example_inputs (a tensor, a tuple of arguments or (args, kwargs)): where the graph pass leaves
    BatchNorms (modules fx cannot trace, reshapes it cannot follow), one forward pass on them is
    recorded and every conv/linear + BatchNorm pair whose dataflow it proves is folded too
    (`graph.fold_recorded`); `report.recorded` lists those pairs. `recorded`: fold exactly these
    pairs instead, without running the model (what a deploy file stored: its skeleton replays them).
    The same input gives the channel counts code reads from a module's input (`groups=x.shape[1]`):
    `report.inputs` lists those a fold used, `recorded_inputs` gives them back (a skeleton's).
    """
    ecosystems.activate()  # recipes of the libraries in use (ultralytics, ...)

    report = ConversionReport()
    # Converted blocks, opaque to the graph pass: a recipe's product is final. A block's own method
    # may leave foldable layers inside what it returns (timm RepGhost keeps its primary conv+BN),
    # so native products are searched by the graph pass like any other module.
    products: list[nn.Module] = []
    ran: list[nn.Module] = []  # native products (folded inside by the graph pass, each on its own)

    def convert_block(module: nn.Module, path: str, inside: str | None) -> nn.Module | None:
        """The deploy form of `module` by its recipe or its own method; None if it is no block.

        `inside` is the path of the natively converted block whose result is being searched again
        (None outside one): there a method that changes nothing is no conversion, and a block the
        parent's method created (no such path in the input model) is reported as part of the parent.
        """
        found = recipe_for(module, recipes)
        if found is not None:
            try:
                deployed = _fuse(found, module, path)
            except Declined:  # a library's recipe that does not know this block: its own method
                found = None
        if found is not None:
            report.converted.append(ConvertedBlock(path, found.name, found.family))
            products.append(deployed)
            _check_finite(module, deployed, path, found.name)
            return deployed
        if native and fuses_natively(module, is_root=not path):
            try:
                deployed = native_fuse(module, path)
            except ReparamError as exc:
                if inside is None:
                    raise
                report.notes.append(f"{exc.message}; kept as {inside}'s own method left it")
                return None
            if inside is not None and unchanged(module, deployed):
                return None
            _check_finite(module, deployed, path, type(module).__name__)
            if inside is None or has_submodule(model, path):
                report.converted.append(ConvertedBlock(path, type(module).__name__, NATIVE))
            ran.append(deployed)
            # Searched again, all the way down: children the block's own method left alone.
            for name, child in deployed._modules.items():
                if child is not None:
                    deployed._modules[name] = walk(child, f"{path}.{name}" if path else name, path)
            return deployed
        return None

    def walk(module: nn.Module, path: str, inside: str | None = None) -> nn.Module:
        deployed = convert_block(module, path, inside)
        if deployed is not None:
            if consume:
                _release(module, deployed)
            return deployed
        if linear_as_conv and type(module) is nn.Linear:
            report.converted.append(ConvertedBlock(path, "Linear", "linear-as-conv"))
            products.append(linear_to_pointwise(module))
            return products[-1]
        module = unparametrized(module)  # a parametrized weight, evaluated once
        new = shallow_copy(module)
        for name, child in module._modules.items():
            if child is not None:
                new._modules[name] = walk(child, f"{path}.{name}" if path else name, inside)
        return new

    if not isinstance(model, nn.Module):
        raise ReparamError(f"expected a torch.nn.Module, got {type(model).__name__}")
    # A model on the meta device (inspect, deploy skeletons) is converted from shapes alone.
    with torch.no_grad(), shape_only() if on_meta(model) else contextlib.nullcontext():
        deployed = walk(model, "")
        # The model's own method only when nothing inside it could be converted (see native.py).
        if native and not report.converted and fuses_natively(model):
            report.converted.append(ConvertedBlock("", type(model).__name__, NATIVE))
            deployed = native_fuse(model, "")
            _check_finite(model, deployed, "", type(model).__name__)
            ran.append(deployed)
        # Model-level steps of a library's own fuse beyond its blocks (ultralytics' Detect.fuse()).
        deployed = ecosystems.finish(model, deployed, report)
        bn_reasons: dict[str, str] = {}
        recorded_reasons: dict[str, str] = {}
        ran_ids = {id(m) for m in ran}
        sealed = [p for p, m in deployed.named_modules() if id(m) in ran_ids]
        if graph:
            inputs = RecordedInputs(example_inputs, recorded_inputs) \
                if example_inputs is not None or recorded_inputs is not None else None
            deployed, report.regions, report.remaining, bn_reasons = fuse_graph(deployed, products, inputs=inputs,
                                                                                sealed=sealed)
            report.inputs = [(p, r, c) for p, (r, c) in sorted(inputs.used.items())] if inputs else []
            if recorded is not None or example_inputs is not None:
                kept = {p for p, why in bn_reasons.items() if why.startswith(KEPT)}
                folds = fold_recorded(deployed, products, example=example_inputs, pairs=recorded, kept=kept,
                                      sealed=sealed)
                report.regions += folds.regions
                report.recorded = folds.pairs
                folded = {bn for _, bn in folds.pairs}
                report.remaining = [r for r in report.remaining if r.path not in folded]
                bn_reasons = {p: why for p, why in bn_reasons.items() if p not in folded}
                recorded_reasons = folds.reasons
        found = report.remaining + leftovers(deployed, products, report.remaining, graph=graph, bn_reasons=bn_reasons,
                                               sealed=sealed)
        if graph and example_inputs is None and recorded is None:  # the API without an input: say what would help
            recorded_reasons = {r.path: "example_inputs= would let a recorded forward pass fold it" for r in found
                                if r.kind == "batchnorm" and r.reason.startswith("inside ")}
        found = [Remaining(r.path, r.kind, f"{r.reason}; {recorded_reasons[r.path]}")
                 if r.kind == "batchnorm" and r.path in recorded_reasons else r for r in found]
        # Each module once: a BatchNorm the pass refused (e.g. without running statistics) is listed
        # as the BatchNorm it is, with that reason, not also as a refusal.
        left = {r.path for r in found if r.kind == "batchnorm"}
        norms = left | {r.path for r in found if r.kind == "kept" and bn_kind(_module_at(deployed, r.path))}
        found = [r for r in found if not (r.kind == "unfoldable" and r.path in norms
                                          or r.kind == "kept" and r.path in left)]
        report.remaining = [r for r in found if r.kind != "kept"]
        report.kept = [r for r in found if r.kind == "kept"]  # no gain in folding: information, not left
        report.remaining, report.skipped = _split_information(deployed, report.remaining)
    if any(m.training for m in model.modules()):
        import warnings

        report.notes.append("the model was in training mode: converted its eval-mode function (BatchNorm running "
                            "statistics); the deploy model is returned in eval mode")
        warnings.warn(report.notes[-1], UserWarning, stacklevel=2)
        deployed.eval()
    return deployed, report
