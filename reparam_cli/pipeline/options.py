"""Options, as objects: how to fuse (`FuseOptions`, stored in every deploy file), how to verify
(`VerifyOptions`) and everything else a conversion takes (`ConvertOptions`), carried as one
object from a command to `convert_checkpoint` and to the batch workers.

Torch-free: the commands build these before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

from reparam_cli.errors import ReparamError
from reparam_cli.io.formats import ALL_FORMATS, DTYPE_NAMES, DYNAMIC_SHAPES

Progress = Callable[[str], None]



def no_progress(_: str) -> None:
    pass


@dataclass
class VerifyOptions:
    """How to verify: random batches of `input_shape` (default: the spec's), tolerances (default: per dtype)."""

    samples: int = 1
    seed: int = 0
    rtol: float | None = None
    atol: float | None = None
    input_shape: tuple[int, ...] | None = None


# Deploy layouts (--layout). "default": the recipes and native methods, then the graph pass wherever a
# fold gains something (fewer parameters, FLOPs or layers). "reference": the layout of the blocks'
# own deploy forms, i.e. the papers' (and libraries') deploy models key for key: recipes and native
# methods only, so the conv-BN pairs and BatchNorms those models keep stay (what --no-graph gives).
LAYOUTS = ("default", "reference")


def check_layout(layout: str) -> None:
    """Raise ReparamError for a layout name that is not one of LAYOUTS."""
    if layout not in LAYOUTS:
        raise ReparamError(f"unknown layout {layout!r}", hint=f"choose one of {', '.join(LAYOUTS)}")


@dataclass(frozen=True)
class FuseOptions:
    """How `reparameterize` fuses beyond the recipes. Stored in every deploy file (`stored()`), so a
    rebuild of the deploy skeleton fuses exactly as the conversion did.

    `layout="reference"` is the named form of the papers' deploy layout: it implies `graph=False`
    (set here, whatever was passed) and excludes `linear_as_conv`, which changes the layout."""

    graph: bool = True  # fold linear regions outside known blocks (--no-graph: False)
    linear_as_conv: bool = False  # nn.Linear -> pointwise conv (paradigm 9)
    # modules the deploy model's eval forward never calls, dropped from the file (--keep-unused: none)
    unused: tuple[str, ...] = ()
    layout: str = "default"  # LAYOUTS (--layout)
    # (layer, BatchNorm) pairs folded on a recorded forward pass (`graph.fold_recorded`): a skeleton
    # replays exactly these; None: the conversion records them itself when given an input
    recorded: tuple[tuple[str, str], ...] | None = None
    # (module path, rank, channels) of recorded module inputs a fold used (`groups=x.shape[1]`)
    inputs: tuple[tuple[str, int, int], ...] | None = None

    def __post_init__(self) -> None:
        check_layout(self.layout)
        if self.layout == "reference":
            if self.linear_as_conv:
                raise ReparamError("--linear-as-conv changes the deploy layout: it cannot be combined with "
                                   "--layout reference", hint="drop one of them")
            object.__setattr__(self, "graph", False)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `reparameterize`."""
        kwargs: dict[str, Any] = {"graph": self.graph, "linear_as_conv": self.linear_as_conv}
        if self.recorded is not None:
            kwargs["recorded"] = self.recorded
        if self.inputs is not None:
            kwargs["recorded_inputs"] = self.inputs
        return kwargs

    def stored(self) -> dict[str, bool | str]:
        """The deploy file's `options` metadata (`linear_as_conv` and `layout` only when set, so files
        read by older versions rebuild the same skeleton from `graph`)."""
        options: dict[str, bool | str] = {"linear_as_conv": True} if self.linear_as_conv else {}
        options["graph"] = self.graph
        if self.layout != "default":
            options["layout"] = self.layout
        if self.unused:
            options["unused"] = list(self.unused)
        if self.recorded:
            options["recorded"] = [list(pair) for pair in self.recorded]
        if self.inputs:
            options["inputs"] = [list(item) for item in self.inputs]
        return options

    @classmethod
    def from_stored(cls, options: Any) -> "FuseOptions":
        """The options a deploy file's metadata records. Files written before the graph pass existed
        store no `graph` option: their skeleton has none. An unknown layout (a newer version's) is
        rebuilt from `graph` alone."""
        options = options if isinstance(options, dict) else {}
        layout = options.get("layout") if options.get("layout") in LAYOUTS else "default"
        linear_as_conv = bool(options.get("linear_as_conv"))
        unused = options.get("unused") or []
        unused = tuple(str(p) for p in unused) if isinstance(unused, list) else ()
        recorded = options.get("recorded")
        recorded = tuple((str(p[0]), str(p[1])) for p in recorded if isinstance(p, list) and len(p) == 2) \
            if isinstance(recorded, list) else None
        inputs = options.get("inputs")
        inputs = tuple((str(p[0]), int(p[1]), int(p[2])) for p in inputs
                       if isinstance(p, list) and len(p) == 3 and all(isinstance(v, int) for v in p[1:])) \
            if isinstance(inputs, list) else None
        return cls(graph=options.get("graph", False) is True, linear_as_conv=linear_as_conv,
                   layout="default" if linear_as_conv else layout, unused=unused, recorded=recorded or None,
                   inputs=inputs or None)


@dataclass
class ConvertOptions:
    """Everything `convert_checkpoint` takes besides the checkpoint, the spec and the output (picklable:
    sent to batch worker processes as it is)."""

    fmt: str = "safetensors"  # ALL_FORMATS
    verify: bool = True  # --no-verify: False
    verify_options: VerifyOptions = field(default_factory=VerifyOptions)
    overwrite: bool = False
    trust_pickle: bool = False
    linear_as_conv: bool = False
    dtype: str | None = None  # the deploy model's dtype (DTYPE_NAMES; None: the checkpoint's)
    ema: bool = False  # the checkpoint's EMA weights
    dynamic_shapes: str = "auto"  # pt2/ONNX dynamic dims (DYNAMIC_SHAPES)
    graph: bool = True  # the graph pass; batch records it per manifest line, resume compares it
    strict: bool = False  # anything foldable left: fail, nothing written
    equalize: bool = False  # cross-layer equalization of the deploy model (for int8), verified end to end
    keep_unused: bool = False  # keep modules the eval forward never calls (default: dropped, named in the report)
    allow_nonfinite: bool = False  # NaN/Inf in the checkpoint: an error unless allowed (--allow-nonfinite)
    layout: str = "default"  # LAYOUTS; "reference" implies graph=False (set here)

    def __post_init__(self) -> None:
        if self.layout == "reference":
            self.graph = False  # so batch manifests and resume see what is done

    @property
    def fuse(self) -> FuseOptions:
        return FuseOptions(graph=self.graph, linear_as_conv=self.linear_as_conv, layout=self.layout)

    @classmethod
    def of(cls, options: "ConvertOptions | None" = None, **changes: Any) -> "ConvertOptions":
        """`options` (or the defaults) with keyword changes, checked. `verify_output` is accepted as
        the older name of `verify`; `verify_options=None` means the defaults."""
        if "verify_output" in changes:
            changes["verify"] = changes.pop("verify_output")
        if changes.get("verify_options", ...) is None:
            changes["verify_options"] = VerifyOptions()
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown conversion option(s): {', '.join(unknown)}")
        out = replace(options or cls(), **changes)
        out.check()
        return out

    def check(self) -> None:
        """Raise ReparamError for a value no conversion accepts (one line, with the choices)."""
        for name, value, choices in (("format", self.fmt, ALL_FORMATS), ("dtype", self.dtype, DTYPE_NAMES),
                                     ("--dynamic-shapes mode", self.dynamic_shapes, DYNAMIC_SHAPES)):
            if value is not None and value not in choices:
                raise ReparamError(f"unknown {name} {value!r}", hint=f"choose one of {', '.join(choices)}")
        self.fuse  # noqa: B018  (the layout, and --linear-as-conv with --layout reference)
