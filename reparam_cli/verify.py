"""Equivalence on random inputs: does the deploy model compute the training model's function?

The reference is the training model evaluated in float64 (its own tensors upcast, not a copy of
the module). Reported, each against that reference:

* the deploy model's max abs error, max relative error (max |deploy - ref| / max |ref|) and
  cosine similarity, end to end;
* the training model's own error in its checkpoint dtype: the floor that rounding alone gives;
* per converted block, the deploy block's relative error on the very input its training block
  saw, so a failing model points at the block that broke.

It passes when max_abs_err <= atol + rtol * max|ref| end to end and for every block.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .stats import FlopCounter

# Defaults per checkpoint dtype: well above the rounding floor, well below what a wrong kernel gives.
DEFAULT_TOLERANCES = {
    torch.float64: (1e-9, 1e-12),
    torch.float32: (1e-4, 1e-6),
    torch.float16: (2e-2, 1e-3),
    torch.bfloat16: (8e-2, 1e-2),
}


@dataclass
class BlockError:
    path: str
    block_type: str
    max_rel_err: float
    ok: bool


@dataclass
class VerifyResult:
    ok: bool
    max_abs_err: float
    max_rel_err: float
    cosine: float
    train_rel_err: float  # the training model's own error in its dtype vs float64
    rtol: float
    atol: float
    samples: int
    input_shape: list[int]
    seed: int
    blocks: list[BlockError] = field(default_factory=list)
    flops_train: int | None = None  # conv/linear FLOPs of one forward pass on input_shape
    flops_deploy: int | None = None
    worst_output: str = "output"  # the output leaf (path in a tuple/list/dict output) with the largest rel error

    def worst_block(self) -> BlockError | None:
        return max(self.blocks, key=lambda b: b.max_rel_err, default=None)

    def to_dict(self) -> dict:
        return asdict(self)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of a model's first floating parameter (float32 if it has none)."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def tolerances(dtype: torch.dtype, rtol: float | None = None, atol: float | None = None) -> tuple[float, float]:
    d_rtol, d_atol = DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES[torch.float32])
    return (d_rtol if rtol is None else rtol), (d_atol if atol is None else atol)


def _float64_state(model: nn.Module) -> dict[str, Tensor]:
    return {
        name: t.to(torch.float64) if t.is_floating_point() else t
        for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    }


def tensor_leaves(out, path: str = "output") -> list[tuple[str, Tensor]]:
    """Every tensor in a model's output, with its path in the structure (`output`, `output[0]`,
    `output['boxes'][1]`, ...). Tuples, lists, dicts and nested mixes are walked in order; other
    values (None, ints, strings) are not compared."""
    if isinstance(out, Tensor):
        return [(path, out)]
    if isinstance(out, (list, tuple)):
        return [leaf for i, item in enumerate(out) for leaf in tensor_leaves(item, f"{path}[{i}]")]
    if isinstance(out, dict):
        return [leaf for k, item in out.items() for leaf in tensor_leaves(item, f"{path}[{k!r}]")]
    return []


def _first_tensor(out) -> Tensor:
    """The first tensor of a model's output (exported files compare this one)."""
    leaves = tensor_leaves(out)
    if not leaves:
        raise TypeError(f"model output of type {type(out).__name__} holds no tensor")
    return leaves[0][1]


def _leaves(out, what: str) -> list[tuple[str, Tensor]]:
    leaves = tensor_leaves(out)
    if not leaves:
        raise ValueError(f"the {what} output (a {type(out).__name__}) holds no tensor to compare")
    return leaves


def _compare(out, ref, rtol: float, atol: float, what: str) -> tuple[float, float, float, bool, str]:
    """(max abs err, max rel err, min cosine, ok, worst leaf path) of `out` against `ref`, leaf by leaf.

    Each leaf's relative error is scaled by that leaf's own magnitude, and each leaf must be within
    atol + rtol * max|leaf| (a small box-coordinate tensor is not hidden by large class scores)."""
    outs, refs = _leaves(out, what), _leaves(ref, "reference")
    if [p for p, _ in outs] != [p for p, _ in refs]:
        raise ValueError(f"the {what} output's structure {[p for p, _ in outs]} differs from the training "
                         f"model's {[p for p, _ in refs]}")
    worst_abs = worst_rel = 0.0
    worst_cos, ok, worst_path = 1.0, True, refs[0][0]
    for (path, o), (_, r) in zip(outs, refs):
        if o.shape != r.shape:
            raise ValueError(f"{what} {path} has shape {tuple(o.shape)}, the training model's {tuple(r.shape)}")
        abs_err, rel_err, cos = _errors(o, r)
        ok &= _within(abs_err, r, rtol, atol)
        if rel_err > worst_rel or (rel_err == worst_rel and abs_err > worst_abs):
            worst_path = path
        worst_abs, worst_rel, worst_cos = max(worst_abs, abs_err), max(worst_rel, rel_err), min(worst_cos, cos)
    return worst_abs, worst_rel, worst_cos, ok, worst_path


def _clone_leaves(out, dtype: torch.dtype | None = None):
    """A copy of an output structure's tensors (later in-place ops must not change what was captured),
    floating ones cast to `dtype` if given."""
    if isinstance(out, Tensor):
        return out.to(dtype) if dtype is not None and out.is_floating_point() else out.clone()
    if isinstance(out, (list, tuple)):
        items = [_clone_leaves(o, dtype) for o in out]
        return items if isinstance(out, list) else tuple(items)
    if isinstance(out, dict):
        return {k: _clone_leaves(v, dtype) for k, v in out.items()}
    return out


def _errors(out: Tensor, ref: Tensor) -> tuple[float, float, float]:
    out64, ref64 = out.detach().to(torch.float64).flatten(), ref.detach().to(torch.float64).flatten()
    diff = (out64 - ref64).abs().max().item() if ref64.numel() else 0.0
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    rel = diff / scale if scale > 0 else diff
    denom = out64.norm() * ref64.norm()
    cos = (out64 @ ref64 / denom).item() if denom > 0 else 1.0
    return diff, rel, cos


def _within(abs_err: float, ref: Tensor, rtol: float, atol: float) -> bool:
    return abs_err <= atol + rtol * ref.detach().abs().max().item()


def verify(
    train_model: nn.Module,
    deploy_model: nn.Module,
    input_shape: Sequence[int],
    *,
    blocks: Sequence[tuple[str, str]] = (),
    samples: int = 1,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
) -> VerifyResult:
    """Compare deploy_model to train_model (both in eval mode) on `samples` random batches of `input_shape`.

    Outputs may be tensors or tuples, lists and dicts of them (nested too): every tensor leaf is
    compared, each within atol + rtol * its own magnitude; `worst_output` names the worst leaf.

    `blocks` lists (path, block type) of converted blocks; each must exist at the same path in both
    models (a TorchScript deploy model gets end-to-end figures only: pass no blocks).
    """
    dtype, deploy_dtype = model_dtype(train_model), model_dtype(deploy_model)
    # The coarser of the two dtypes sets the default tolerances.
    coarse = max((dtype, deploy_dtype), key=lambda d: tolerances(d)[0])
    rtol, atol = tolerances(coarse, rtol, atol)
    was_training = train_model.training
    train_model.eval()
    deploy_model.eval()
    state64 = _float64_state(train_model)
    gen = torch.Generator().manual_seed(seed)
    worst_abs = worst_rel = 0.0
    worst_cos = 1.0
    train_rel = 0.0
    ok = True
    block_errors: dict[str, BlockError] = {}
    flops: tuple[int | None, int | None] = (None, None)
    worst_output = "output"
    try:
        with torch.no_grad():
            for i in range(samples):
                x64 = torch.randn(*input_shape, generator=gen, dtype=torch.float64)
                captured: dict[str, tuple[Tensor, Tensor]] = {}
                hooks = []
                if i == 0:  # per-block figures from the first sample keep memory bounded
                    for path, _ in blocks:
                        def hook(_m, args, out, path=path):
                            # Copies: later in-place ops (timm's `x += shortcut`) would change them.
                            captured[path] = (_clone_leaves(args[0]), _clone_leaves(out))
                        hooks.append(train_model.get_submodule(path).register_forward_hook(hook))
                try:
                    ref = functional_call(train_model, state64, (x64,))
                finally:
                    for h in hooks:
                        h.remove()
                x = x64.to(dtype)
                # FLOPs are read off the first sample's passes (hooks, no extra forward).
                count_train, count_deploy = FlopCounter(), FlopCounter()
                countable = i == 0 and not isinstance(deploy_model, torch.jit.ScriptModule)
                with count_deploy.attach(deploy_model) if countable else contextlib.nullcontext():
                    out = deploy_model(x64.to(deploy_dtype))
                with count_train.attach(train_model) if countable else contextlib.nullcontext():
                    own = train_model(x)
                if countable:
                    flops = (count_train.total, count_deploy.total)
                abs_err, rel_err, cos, out_ok, out_path = _compare(out, ref, rtol, atol, "deploy model")
                train_rel = max(train_rel, _compare(own, ref, rtol, atol, "training model")[1])
                ok &= out_ok
                if rel_err >= worst_rel:
                    worst_output = out_path
                worst_abs, worst_rel, worst_cos = max(worst_abs, abs_err), max(worst_rel, rel_err), min(worst_cos, cos)
                for path, block_type in blocks:
                    if path not in captured:
                        continue
                    inp, block_ref = captured[path]
                    block_out = deploy_model.get_submodule(path)(_clone_leaves(inp, deploy_dtype))
                    _, b_rel, _, b_ok, _ = _compare(block_out, block_ref, rtol, atol, f"deploy block {path}")
                    ok &= b_ok
                    block_errors[path] = BlockError(path, block_type, b_rel, b_ok)
    finally:
        train_model.train(was_training)
    return VerifyResult(
        ok=bool(ok), max_abs_err=worst_abs, max_rel_err=worst_rel, cosine=worst_cos, train_rel_err=train_rel,
        rtol=rtol, atol=atol, samples=samples, input_shape=list(input_shape), seed=seed,
        blocks=list(block_errors.values()), flops_train=flops[0], flops_deploy=flops[1], worst_output=worst_output,
    )
