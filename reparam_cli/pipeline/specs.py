"""Model specs: how to build the training-form model a checkpoint belongs to.

A spec reference (`--spec`) is one of:

* a built-in name, e.g. `repvgg-a0` (a YAML file in `reparam_cli/model_specs/`), or a YAML file, optionally
  with builder arguments as a query: `repvgg-a0?num_classes=10`,
* a path to a YAML file,
* a Python file `spec.py` exposing `build_model()`, or `spec.py:function`,
* `checkpoint`: the checkpoint holds the whole model (a pickled nn.Module, e.g. an ultralytics
  `.pt`), which is used as it is; needs `--trust-pickle` (see `pipeline.read_training_model`),
* a library's model: `ultralytics:<yaml>`, `timm:<model_name>` or `mmpretrain:<model name or config.py>`, optionally
  with keyword arguments as a query: `timm:repvgg_a0?num_classes=10&in_chans=1` (values parsed
  as YAML scalars or lists). Built without pretrained weights: weights come from the checkpoint,
  nothing is downloaded (details in `reparam_cli/ecosystems/`).

A YAML spec names a builder (`module:callable`), its keyword arguments, the verification input
shape and optional checkpoint options:

    name: repvgg-a0
    description: RepVGG-A0, ImageNet classifier
    builder: reparam_cli.blocks.repvgg:RepVGG
    args: {num_blocks: [2, 4, 14, 1], width_multiplier: [0.75, 0.75, 0.75, 2.5]}
    input_shape: [1, 3, 224, 224]
    checkpoint: {key: state_dict, strip_prefix: module.}

A Python spec may also define `INPUT_SHAPE`, `CHECKPOINT` (a dict like the YAML key) and
`make_inputs(shape, generator, dtype)`, the verification input hook (YAML: `inputs: module:function`):
it returns a tensor, a tuple of positional arguments, or `(args, kwargs)` (see `reparam_cli.verification`).

The built-in specs ship inside the package (`reparam_cli/model_specs/*.yaml`). Specs stored in
deploy files are data: only the kinds in `SAFE_SPEC_KINDS` are rebuilt without --trust-spec.
Torch-free: `check_spec_ref` answers a bad reference before torch is imported.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from reparam_cli.core.spec import (CHECKPOINT_SPEC, DEFAULT_INPUT_SHAPE, ModelSpec, TIMM_BUILDERS, TIMM_PREFIX,
                                   _import_file, _shape, checkpoint_spec, load_yaml, parse_query)
from reparam_cli.errors import SpecError
from reparam_cli.extras import EXTRAS, require_extra

# The built-in specs: data files inside the package (REPARAM_SPECS_DIR points elsewhere, for tests).
SPECS_DIR = Path(os.environ.get("REPARAM_SPECS_DIR", Path(__file__).resolve().parent.parent / "model_specs"))
_KNOWN_KEYS = {"name", "description", "builder", "args", "input_shape", "checkpoint", "family", "deploy_params",
               "inputs"}


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")


def is_builtin_name(name: str) -> bool:
    """Whether `name` is a built-in spec's name: a plain name (no path separator, no `..`, nothing
    hidden) that is in the catalogue. A name is never read as a path."""
    return bool(_NAME.fullmatch(name)) and ".." not in name and name in builtin_names()


def builtin_path(name: str) -> Path:
    """The YAML file of built-in spec `name`; SpecError when the name is not in the catalogue."""
    if not is_builtin_name(name):
        raise SpecError(f"unknown spec {name!r}", hint=suggest_spec_names(name))
    return SPECS_DIR / f"{name}.yaml"


def builtin_data(name: str) -> dict:
    """A built-in spec's YAML as data (for keys a ModelSpec does not carry, such as `family`)."""
    return load_yaml(builtin_path(name).read_text(), f"spec {name}") or {}




def builtin_names() -> list[str]:
    """Names of the built-in specs (YAML files in model_specs/), sorted."""
    return sorted(p.stem for p in SPECS_DIR.glob("*.yaml"))


def list_builtin() -> list[dict]:
    """Every built-in spec as its YAML says (name, family, description, input shape, builder), read
    without torch or building anything: what `reparam specs` lists unless asked for --params. A file
    that cannot be read is listed with an `error`."""
    rows = []
    for name in builtin_names():
        row: dict = {"name": name}
        try:
            spec = _yaml_spec(SPECS_DIR / f"{name}.yaml", source=name)
            row.update(family=builtin_data(name).get("family"), description=spec.description,
                       input_shape=list(spec.input_shape), builder=spec.builder)
        except SpecError as exc:
            row["error"] = str(exc)
        rows.append(row)
    return rows


def load_spec(ref: str) -> ModelSpec:
    """Resolve a `--spec` reference (built-in name, YAML path, or Python file[:function])."""
    if not ref:
        raise SpecError("no spec given", hint="pass --spec NAME, a YAML file or a Python file")
    if ref == CHECKPOINT_SPEC:
        return checkpoint_spec()
    from reparam_cli.ecosystems import spec_for

    found = spec_for(ref)
    if found is not None:
        return found
    py_path, _, func = ref.partition(".py:")
    if ref.endswith(".py") or func:
        return _python_spec(Path(f"{py_path}.py" if func else ref), func or "build_model")
    base, _, query = ref.partition("?")
    args = parse_query(query, ref)
    path = Path(base)
    if ":" in base and path.suffix not in (".yaml", ".yml") and not path.exists():
        return _callable_spec(ref, base, args)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise SpecError(f"spec file not found: {base}")
        spec = _yaml_spec(path, source=str(path.resolve()))
    else:
        check_spec_ref(ref)  # unknown names: suggestions
        spec = _yaml_spec(builtin_path(base), source=base)
    if args:  # `repvgg-a0?num_classes=10`: override the builder's keyword arguments
        spec.args = {**spec.args, **args}
        spec.name, spec.source = f"{spec.name}?{query}", f"{spec.source}?{query}"
    return spec


# Spec references other than built-in names that need no file: load_spec (or an ecosystem) resolves them.
_NAMED_REFS = {"checkpoint"}


def check_spec_ref(ref: str) -> None:
    """Torch-free check of a `--spec` reference, done before any work: a spec file that does not exist,
    an unknown built-in name (with the closest names, and `timm:<name>` when it looks like a timm
    model) or a timm spec without timm raise SpecError. References it cannot judge pass."""
    base = ref.partition("?")[0]
    if ref.startswith(TIMM_PREFIX):
        require_extra("timm", f"spec {ref.partition('?')[0]!r}")
        return
    py_path, _, func = ref.partition(".py:")
    if ref.endswith(".py") or func:
        path = Path(f"{py_path}.py" if func else ref)
        if not path.is_file():
            raise SpecError(f"spec file not found: {path}")
        return
    prefix, colon, _ = base.partition(":")
    if colon and prefix.isidentifier():  # a library's spec, `ultralytics:yolov8n.yaml`

        if prefix in EXTRAS:
            require_extra(prefix, f"spec {base!r}")
        return
    if Path(base).suffix in (".yaml", ".yml"):
        if not Path(base).is_file():
            raise SpecError(f"spec file not found: {base}")
        return
    if base in _NAMED_REFS or is_builtin_name(base):
        return  # a built-in
    if ":" in base and "/" not in base.partition(":")[0] and ".." not in base.partition(":")[0]:
        return  # an ecosystem prefix (resolved by load_spec)
    raise SpecError(f"unknown spec {base!r}", hint=suggest_spec_names(base))


def suggest_spec_names(name: str) -> str:
    """What to try instead of an unknown spec name: the closest built-in names, and `timm:<name>`
    when the name is spelled like a timm model (lower case words joined by underscores)."""
    import difflib
    import re

    names = builtin_names()
    key = name.lower().replace("_", "-")
    close = [n for n in names if n == key]  # repvgg_a0 -> repvgg-a0 alone
    if not close:
        close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
        close += [n for n in names if (key in n or n in key) and n not in close]
    options = [f"--spec {n}" for n in close[:3]]
    if re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9.]+)+", name):
        options.append(f"--spec timm:{name}")
    if options:
        return f"did you mean {', '.join(options)}? `reparam specs` lists the built-in specs"
    return "run `reparam specs` to list the built-in specs, or pass a YAML or Python spec file"


def routes() -> list[str]:
    """The library routes a `--spec prefix:...` reference may take (one per ecosystems/ file)."""
    from reparam_cli.ecosystems import ECOSYSTEMS

    return sorted(f"{ours.rsplit('.', 1)[1]}:" for ours in ECOSYSTEMS.values())


def _callable_spec(ref: str, base: str, args: dict[str, Any]) -> ModelSpec:
    """`package.module:callable[?key=value]` (a builder in the user's importable code) as a spec; any
    other `prefix:...` answers with the routes that exist and how to write a spec.py."""
    import importlib.util

    module, _, func = base.partition(":")
    found = None
    if module and all(part.isidentifier() for part in module.split(".")) and func.isidentifier():
        import sys

        added = os.getcwd() not in sys.path
        if added:  # the user's package, imported as their training script run from here imports it
            sys.path.insert(0, os.getcwd())
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
    if found is None:
        import difflib

        close = difflib.get_close_matches(module + ":", routes(), n=1, cutoff=0.6)
        guess = f"did you mean {close[0]}? " if close else ""
        raise SpecError(f"unknown spec route {module + ':'!r} in {ref!r}: {guess}reparam's routes are "
                        f"{', '.join(routes())} (e.g. torchvision:resnet18), a built-in name, a YAML file, "
                        "`package.module:callable` or a spec.py",
                        hint="for your own model write spec.py with `def build_model(): return MyNet(...)` "
                             "and pass --spec spec.py")
    return ModelSpec(name=ref, builder=base, args=args, input_shape=DEFAULT_INPUT_SHAPE,
                     description=f"{func}() from {module}", source=ref)


def _yaml_spec(path: Path, source: str) -> ModelSpec:
    import yaml

    try:
        data = load_yaml(path.read_text(), f"spec {path}")
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SpecError(f"cannot read spec {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or "builder" not in data:
        raise SpecError(f"spec {path} must be a mapping with at least a 'builder' key")
    unknown = set(data) - _KNOWN_KEYS
    if unknown:
        raise SpecError(f"spec {path} has unknown keys: {', '.join(sorted(unknown))}",
                        hint=f"known keys: {', '.join(sorted(_KNOWN_KEYS))}")
    args = data.get("args") or {}
    if not isinstance(args, dict):
        raise SpecError(f"spec {path}: 'args' must be a mapping of keyword arguments")
    return ModelSpec(
        name=str(data.get("name") or path.stem), builder=str(data["builder"]), args=args,
        input_shape=_shape(data.get("input_shape", DEFAULT_INPUT_SHAPE), path),
        checkpoint=dict(data.get("checkpoint") or {}), description=str(data.get("description", "")), source=source,
        inputs=str(data.get("inputs") or ""),
    )


def _python_spec(path: Path, func: str) -> ModelSpec:
    module = _import_file(path)
    if not callable(getattr(module, func, None)):
        raise SpecError(f"{path} has no function {func}()", hint="define build_model() or pass file.py:function")
    shape = getattr(module, "INPUT_SHAPE", DEFAULT_INPUT_SHAPE)
    ref = f"{path.resolve()}:{func}"
    return ModelSpec(
        name=path.stem, builder=ref, args={}, input_shape=_shape(shape, path),
        checkpoint=dict(getattr(module, "CHECKPOINT", {}) or {}),
        description=(module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else "", source=ref,
        inputs=f"{path.resolve()}:make_inputs" if callable(getattr(module, "make_inputs", None)) else "",
    )


# --- Specs stored in deploy files are data ---------------------------------------------------------
# A deploy file's metadata names the builder it was converted with. Rebuilding from it must not let
# a crafted file run code, so without --trust-spec only these kinds are rebuilt: builders that reparam
# (or a library it integrates) ships, which build networks and nothing else, called with plain JSON
# arguments. Other ecosystems add one line each: kind name -> predicate on the builder string.
_OWN_BUILDER = re.compile(r"reparam_cli\.(blocks|models)(\.[A-Za-z_]\w*)+:[A-Za-z_]\w*")


SAFE_SPEC_KINDS: dict[str, Callable[[str], bool]] = {
    "built-in": lambda builder: _OWN_BUILDER.fullmatch(builder) is not None,
    "timm": lambda builder: builder in TIMM_BUILDERS,
    # ultralytics builds from its YAML configuration in its restricted mode (no eval, layers only).
    "ultralytics": lambda builder: _library_of_builder(builder) == "ultralytics",
    # mmpretrain builds a model-zoo name from its own configs (a config .py path is not plain data).
    "mmpretrain": lambda builder: _library_of_builder(builder) == "mmpretrain",
    # torchvision builds a builder name from torchvision.models, always without weights.
    "torchvision": lambda builder: _library_of_builder(builder) == "torchvision",
    # transformers builds a model type's config (plain overrides) with from_config: no hub, no files.
    "transformers": lambda builder: _library_of_builder(builder) == "transformers",
}


def _library_of_builder(builder: str) -> str | None:
    from reparam_cli.ecosystems import library_of_builder

    return library_of_builder(builder)


def safe_spec_kind(spec: ModelSpec) -> str | None:
    """The SAFE_SPEC_KINDS entry a stored spec belongs to, or None when rebuilding it could run
    arbitrary code (another module, a .py file, or arguments that are not plain JSON data)."""
    kind = next((k for k, is_kind in SAFE_SPEC_KINDS.items() if is_kind(spec.builder)), None)
    if kind is None or not all(isinstance(k, str) and _plain_data(v) for k, v in spec.args.items()):
        return None
    return kind


def _plain_data(value: Any) -> bool:
    """JSON scalars and (nested) lists and string-keyed dicts of them; strings that look like a builder
    or a file are not data."""
    if isinstance(value, list):
        return all(_plain_data(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_data(v) for k, v in value.items())
    if isinstance(value, str):
        return ":" not in value and not value.endswith(".py") and "/" not in value
    return value is None or isinstance(value, (bool, int, float))


def check_stored_spec(spec: ModelSpec, trust: bool = False) -> ModelSpec:
    """`spec` (read from a deploy file's metadata) if it may be rebuilt; raises SpecError otherwise.

    With `trust` (--trust-spec) any builder is accepted, like --trust-pickle for checkpoints. A
    built-in builder must still resolve to code of reparam's own blocks/models packages.
    """
    if trust:
        return spec
    kind = safe_spec_kind(spec)
    if kind == "built-in":  # defined in the blocks/models module it names, not merely imported there
        module = getattr(spec.resolve_builder(), "__module__", None) or ""
        kind = kind if module == spec.builder.partition(":")[0] and module != "reparam_cli.blocks.registry" else None
    if kind is None:
        raise SpecError(f"the deploy file's stored spec names the builder {spec.builder!r} (or arguments) that "
                        "reparam does not run from a file's metadata: a deploy file is data, not code",
                        hint="pass the spec explicitly (--spec, or load_deploy(path, spec=...)), or --trust-spec "
                             "(trust_spec=True) if you trust this file")
    # A stored verification-input hook names code too; rebuilding never needs it.
    return replace(spec, inputs="") if spec.inputs else spec


_ULTRALYTICS_KEY = r"model\.\d+\."


_TIMM_KEYS = ("stem.conv_kxk", "head.fc.", "stages.0.0.conv_kxk")  # timm's byobnet (RepVGG, MobileOne)


_REFERENCE_FAMILIES = {"rbr_dense": "repvgg", "rbr_conv": "mobileone", "square_conv": "resnet18-acb",
                       "dbb_origin": "dbb"}


# Module names of training-time branches, which a deploy form (reparam's or a reference's) never keeps:
# the built-in families' (the papers' key names) and timm's / mmpretrain's re-parameterizable blocks.
_TRAINING_BRANCH = re.compile(
    r"rbr_dense|rbr_1x1|rbr_identity|rbr_conv|rbr_scale|rbr_skip"  # RepVGG, MobileOne
    r"|square_conv|ver_conv|hor_conv|dbb_origin|dbb_avg|dbb_1x1|dbb_1x1_kxk"  # ACNet, DBB
    r"|convmap|fc3_bn|repconv\d+|dwconv\d+"  # RefConv, RepMLP, RepNeXt (shortcut)
    r"|conv_[2357]_[2357whl]|head_dist"  # RepNeXt-M's RepDWConvS/M, its distillation head
    r"|conv_kxk|conv_scale|branch_3x3|branch_1x1|branch_norm")  # timm byobnet, mmpretrain


def training_branch_key(keys) -> str | None:
    """The first key naming a training-time branch of a re-parameterizable block (RepVGG's
    `rbr_dense`, DBB's `dbb_avg`, RefConv's `convmap`, ...), or None: then the keys are those of a
    deploy form (or of a network without such blocks), e.g. a reference implementation's fused model."""
    for key in keys:
        if any(_TRAINING_BRANCH.fullmatch(part) for part in key.split(".")):
            return key
    return None


def layout_hint(state: dict[str, Any], model: Any, spec: ModelSpec) -> str | None:
    """When a checkpoint's keys do not fit `model` (built from `spec`), what would fit, if it can be told
    from the key names and shapes: an ultralytics or timm layout (-> that --spec), the papers'
    reference layout (-> the built-in spec that fits), or the same model with another number of
    classes (-> `?num_classes=N`). None when nothing better than "check the --spec" can be said."""
    import re

    keys = list(state)
    if not keys:
        return None
    if sum(bool(re.match(_ULTRALYTICS_KEY, k)) for k in keys) > len(keys) / 2:
        return ("its keys (model.N.*) look like an ultralytics model: use --spec ultralytics:<model>.yaml "
                "(e.g. ultralytics:yolov8n.yaml), or --trust-pickle --spec checkpoint for a best.pt")
    shapes = {k: tuple(getattr(t, "shape", ())) for k, t in state.items()}
    classes = _num_classes_hint(shapes, model, spec)
    if classes:
        return classes
    if any(k.startswith(_TIMM_KEYS) for k in keys) and not spec.name.startswith(TIMM_PREFIX):
        name = spec.name.partition("?")[0].replace("-", "_") if spec.source.partition("?")[0] in builtin_names() \
            else "<model_name>"
        return f"its keys (stem.conv_kxk, stages.N, head.fc) look like a timm model: use --spec timm:{name}"
    for marker, family in _REFERENCE_FAMILIES.items():
        if any(f".{marker}." in f".{k}" for k in keys):
            fits = _fitting_builtins(shapes, family)
            if fits:
                return f"its keys fit the built-in spec: use --spec {fits}"
            return (f"its keys ({marker}) look like the {family} reference code: pick the built-in {family} spec "
                    "of its size (`reparam specs` lists them)")
    return None


def _classifier_change(shapes: dict[str, tuple], expected: dict[str, tuple]) -> int | None:
    """The checkpoint's number of classes when it differs from the model's only in the last layer's outputs."""
    if set(shapes) - set(expected) or {k for k in set(expected) - set(shapes) if not k.endswith("num_batches_tracked")}:
        return None
    differ = [k for k in expected if k in shapes and shapes[k] != expected[k]]
    last = [k for k in expected if k.endswith((".weight", ".bias"))][-2:]
    if not differ or not set(differ) <= set(last) or any(not shapes[k] for k in differ):
        return None
    counts = {shapes[k][0] for k in differ}
    return counts.pop() if len(counts) == 1 and all(shapes[k][1:] == expected[k][1:] for k in differ) else None


def _num_classes_hint(shapes: dict[str, tuple], model: Any, spec: ModelSpec) -> str | None:
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    n = _classifier_change(shapes, expected)
    if n is None:
        return None
    if spec.builder.endswith(".py:" + spec.builder.rpartition(":")[2]) and spec.source == spec.builder:
        return f"its classifier has {n} outputs: build the model in your spec with {n} classes"
    ref = spec.source if spec.source.partition("?")[0] in builtin_names() or spec.source.startswith(TIMM_PREFIX) \
        else spec.source or spec.name
    base, _, query = ref.partition("?")
    kept = [part for part in query.split("&") if part and part.partition("=")[0] != "num_classes"]
    return f"its classifier has {n} outputs: use --spec '{base}?{'&'.join([*kept, f'num_classes={n}'])}'"


def _fitting_builtins(shapes: dict[str, tuple], family: str) -> str | None:
    """The built-in spec of `family` whose training model the keys fit (with ?num_classes=N if needed)."""
    for name in builtin_names():
        if not name.startswith(family) and family not in name:
            continue
        try:
            model = load_spec(name).build(device="meta")
        except Exception:  # a broken builder is not the user's problem here
            continue
        expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
        missing = {k for k in set(expected) - set(shapes) if not k.endswith("num_batches_tracked")}
        if not missing and set(shapes) <= set(expected) and all(shapes[k] == expected[k] for k in shapes):
            return name
        n = _classifier_change(shapes, expected)
        if n is not None:
            return f"'{name}?num_classes={n}'"
    return None


def as_spec(spec: ModelSpec | str) -> ModelSpec:
    """A ModelSpec as it is, or a --spec reference resolved."""
    return load_spec(spec) if isinstance(spec, str) else spec
