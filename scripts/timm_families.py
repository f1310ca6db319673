"""Every timm model with a native deploy method, converted by reparam and compared with timm's own
`reparameterize_model`; writes the markdown table in docs/timm-families.md.

    PYTHONPATH=. python scripts/timm_families.py                 # scan, convert one per family, write the doc
    PYTHONPATH=. python scripts/timm_families.py --all           # convert every model found (slow)
    PYTHONPATH=. python scripts/timm_families.py --only ghostnet,shvit --print   # a few families, table to stdout

1. Scan: every model of `timm.list_models()` whose file defines `fuse()`, `reparameterize()` or
   `switch_to_deploy()`, or imports a timm model file that does (a source check), is built on the
   meta device (no weights) and kept when a module in it has such a method (the conventions
   timm's `reparameterize_model` walks). A family is a timm model file plus the set of block types
   with such methods; its smallest model (by parameters) stands for it unless `--all`.
2. Convert: the model is built on CPU with timm's random init and randomised BatchNorm statistics
   (`reparam init`), converted with `reparam convert` (verified per block against a float64
   reference) on a 1x3x64x64 input, or on timm's default input size when the model needs it, and
   written as safetensors; the file is loaded back with `load_deploy`.
3. Compare with `timm.utils.reparameterize_model` on the same model: BatchNorm layers, parameters
   (reparam's must be no more than timm's), and outputs (both relative to the float64 reference).

Status: `ok` when reparam verified, has no more BatchNorms and parameters than timm, and the
reloaded file computes the verified function; otherwise what failed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from reparam_cli.blocks.registry import native_methods  # noqa: E402
from reparam_cli.core.tensors import count_parameters  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "timm-families.md"
SMALL = (1, 3, 64, 64)


@dataclass
class Found:
    """A timm model with native deploy methods, from a meta build."""

    model: str
    family: str  # timm's model file, e.g. "fastvit"
    blocks: list[str]  # block types with a native method
    params: int


@dataclass
class Row:
    model: str
    family: str
    blocks: list[str]
    input_shape: list[int] = field(default_factory=list)
    bn_before: int | None = None
    bn_reparam: int | None = None
    bn_timm: int | None = None
    params_before: int | None = None
    params_reparam: int | None = None
    params_timm: int | None = None
    rel_err: float | None = None  # reparam's deploy model vs the float64 reference (verified)
    timm_rel_err: float | None = None  # timm's reparameterize_model vs the same reference
    reload_rel_err: float | None = None  # the written file loaded back with load_deploy
    seconds: float | None = None
    status: str = ""


def batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def candidate_models() -> list[str]:
    """timm's models whose file defines a native method or imports a timm model file that does
    (a source check: the other ~85% of timm cannot contain such a block, so need no meta build)."""
    import importlib
    import inspect
    import re

    import timm

    files = {m: inspect.getsource(importlib.import_module(f"timm.models.{m}")) for m in timm.list_modules()}
    defining = {m for m, src in files.items() if re.search(r"def (fuse|reparameterize|switch_to_deploy)\(", src)}
    importing = {m for m, src in files.items()
                 if re.search(r"from (\.|timm\.models\.)(%s) import" % "|".join(sorted(defining)), src)}
    return sorted(n for m in defining | importing for n in timm.list_models(module=m))


def scan(names: list[str] | None = None) -> tuple[list[Found], dict[str, str]]:
    """Models with a native method anywhere (meta builds), and the models that could not be built."""
    import timm

    found, failed = [], {}
    for name in names or candidate_models():
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                model = timm.create_model(name, pretrained=False)
        except Exception as exc:  # noqa: BLE001 - some constructors compute on data
            failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:120]
            continue
        blocks = sorted({type(m).__name__ for m in model.modules() if native_methods(m)})
        if blocks:
            family = type(model).__module__.rsplit(".", 1)[-1]
            found.append(Found(name, family, blocks, count_parameters(model)))
    return found, failed


def representatives(found: list[Found]) -> list[Found]:
    """The smallest model of each family (timm file + native block types)."""
    best: dict[tuple[str, tuple[str, ...]], Found] = {}
    for f in found:
        key = (f.family, tuple(f.blocks))
        if key not in best or f.params < best[key].params:
            best[key] = f
    return sorted(best.values(), key=lambda f: (f.family, f.model))


def _rel(out, ref) -> float:
    from reparam_cli.verification.equivalence import tensor_leaves

    worst = 0.0
    for (_, o), (_, r) in zip(tensor_leaves(out), tensor_leaves(ref)):
        scale = r.abs().max().item() or 1.0
        worst = max(worst, (o.double() - r).abs().max().item() / scale)
    return worst


def convert_one(f: Found, work: Path) -> Row:
    """Convert one model with reparam (the CLI's pipeline) and compare with timm's own fuse."""
    import timm
    from timm.utils import reparameterize_model

    from reparam_cli.pipeline.deploy import load_deploy
    from reparam_cli.errors import ReparamError, VerificationFailed
    from reparam_cli.pipeline.options import VerifyOptions
    from reparam_cli.pipeline.conversion import convert_checkpoint, init_checkpoint
    from reparam_cli.pipeline.specs import load_spec

    row = Row(f.model, f.family, f.blocks)
    start = time.perf_counter()
    ref_name = f"timm:{f.model}"
    spec = load_spec(ref_name)
    ckpt, out = work / f"{f.model}.pth", work / f"{f.model}.deploy.safetensors"
    try:
        init_checkpoint(spec, ckpt, seed=0, overwrite=True)
        train = spec.build().eval()
        train.load_state_dict(torch.load(ckpt, weights_only=True))
        shape = SMALL
        try:
            with torch.no_grad():
                train(torch.zeros(SMALL))
        except Exception:  # noqa: BLE001 - fixed-resolution models (attention biases, RepMLP)
            shape = tuple(spec.input_shape)
        row.input_shape = list(shape)
        row.bn_before, row.params_before = batchnorms(train), count_parameters(train)
        try:
            report = convert_checkpoint(ckpt, spec, out, overwrite=True,
                                        verify_options=VerifyOptions(input_shape=shape))
        except (ReparamError, VerificationFailed) as exc:
            row.status = f"reparam: {exc}"[:200]
            report = getattr(exc, "report", None) or {}
            row.rel_err = report.get("max_rel_err")
            return row
        row.rel_err, row.params_reparam = report["max_rel_err"], report["params_after"]
        deploy = load_deploy(out)
        row.bn_reparam = batchnorms(deploy)
        theirs = reparameterize_model(train).eval()
        row.bn_timm, row.params_timm = batchnorms(theirs), count_parameters(theirs)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = torch.func.functional_call(train, {k: v.double() if v.is_floating_point() else v
                                                     for k, v in train.state_dict().items()}, (x.double(),))
            row.timm_rel_err = _rel(theirs(x), ref)
            row.reload_rel_err = _rel(deploy(x), ref)
        problems = []
        if row.bn_reparam > row.bn_timm:
            problems.append(f"keeps {row.bn_reparam - row.bn_timm} BN timm removes")
        if row.params_reparam > row.params_timm:
            problems.append(f"{row.params_reparam - row.params_timm} more params than timm")
        if not math.isfinite(row.reload_rel_err) or row.reload_rel_err > 1e-4:
            problems.append(f"reloaded file differs ({row.reload_rel_err:.2g})")
        row.status = "; ".join(problems) or "ok"
    except Exception as exc:  # noqa: BLE001 - the sweep goes on; the row says what broke
        row.status = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
    finally:
        row.seconds = round(time.perf_counter() - start, 1)
        for p in (ckpt, out):
            p.unlink(missing_ok=True)
    return row


def number_cell(v, fmt: str = ",") -> str:
    """A figure for a markdown table cell: '-' for none, floats as 1.2e-07."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.1e}"
    return format(v, fmt)


def markdown(rows: list[Row], found: list[Found], failed: dict[str, str], timm_version: str) -> str:
    converted = {r.model for r in rows}
    ok = sum(r.status == "ok" for r in rows)
    lines = [
        "# timm families: reparam vs timm's `reparameterize_model`",
        "",
        f"Generated by `scripts/timm_families.py` with timm {timm_version} and torch {torch.__version__}: "
        f"{len(found)} timm models define `fuse()`, `reparameterize()` or `switch_to_deploy()` somewhere; "
        f"{len(rows)} converted (one per family unless `--all`), {ok} ok. Random weights, randomised "
        "BatchNorm statistics; errors are relative to the float64 reference (max abs error / max |reference|).",
        "",
        "| model | family | BN before / reparam / timm | params before / reparam / timm | rel err reparam / timm / reloaded | input | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.family} | {number_cell(r.bn_before)} / {number_cell(r.bn_reparam)} / {number_cell(r.bn_timm)} "
            f"| {number_cell(r.params_before)} / {number_cell(r.params_reparam)} / {number_cell(r.params_timm)} "
            f"| {number_cell(r.rel_err)} / {number_cell(r.timm_rel_err)} / {number_cell(r.reload_rel_err)} "
            f"| {'x'.join(map(str, r.input_shape[2:])) or '-'} | {r.status.replace('|', '/')} |")
    lines += ["", "Every model found, by family (converted ones in bold):", ""]
    by_family: dict[str, list[str]] = {}
    for f in found:
        by_family.setdefault(f"{f.family} ({', '.join(f.blocks)})", []).append(
            f"**{f.model}**" if f.model in converted else f.model)
    for family, models in sorted(by_family.items()):
        lines.append(f"* {family}: {', '.join(models)}")
    if failed:
        lines += ["", f"{len(failed)} timm models could not be built on the meta device, so were not scanned: "
                  + ", ".join(sorted(failed)), ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="convert every model found, not one per family")
    parser.add_argument("--only", default="", help="comma-separated families (timm model files) to convert")
    parser.add_argument("--scan-cache", type=Path, help="JSON file to keep the scan in (reused when present)")
    parser.add_argument("--print", action="store_true", help="print the markdown instead of writing docs/timm-families.md")
    parser.add_argument("-o", "--output", type=Path, default=DOC)
    args = parser.parse_args(argv)
    import timm

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.scan_cache and args.scan_cache.is_file():
        data = json.loads(args.scan_cache.read_text())
        found, failed = [Found(**f) for f in data["found"]], data["failed"]
    else:
        found, failed = scan()
        if args.scan_cache:
            args.scan_cache.write_text(json.dumps({"found": [asdict(f) for f in found], "failed": failed}))
    print(f"{len(found)} models with native methods, {len(failed)} not buildable on meta", file=sys.stderr)
    todo = found if args.all else representatives(found)
    if args.only:
        todo = [f for f in todo if f.family in set(args.only.split(","))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for f in todo:
            row = convert_one(f, Path(tmp))
            print(f"{row.model}: {row.status} ({row.seconds}s)", file=sys.stderr)
            rows.append(row)
    text = markdown(rows, found, failed, timm.__version__)
    if args.print:
        print(text)
    else:
        args.output.write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0 if all(r.status == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
