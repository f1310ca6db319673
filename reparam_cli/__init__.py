"""reparam: convert structurally re-parameterized training checkpoints into fused deploy models.

Python API (imported lazily, so `import reparam_cli` does not pull in torch until used):

    from reparam_cli import convert_checkpoint, load_deploy, load_spec, load_training_model
    from reparam_cli import reparameterize, save_deploy, verify

    report = convert_checkpoint("a0.pth", "repvgg-a0", "a0.deploy.safetensors")  # what `reparam convert` does
    model = load_deploy("a0.deploy.safetensors")          # runnable deploy model

    spec = load_spec("repvgg-a0")                          # step by step, in memory:
    train = load_training_model("a0.pth", spec)            # built on meta, the checkpoint's tensors assigned
    deploy, conv_report = reparameterize(train)            # any nn.Module with known blocks
    result = verify(train, deploy, (1, 3, 64, 64))         # float64 reference, per-block figures
    save_deploy("a0.deploy.safetensors", deploy, spec, result)

Every name here is a function or class. The package, bottom to top (a folder imports only the
ones below it): `core/` (the math: algebra; the spec data type), `blocks/` + `models/` (block
families and their recipes; architectures), `io/` (file formats), `ecosystems/` (timm,
ultralytics, mmpretrain conventions), `convert/` (engine, native methods, graph pass), `verification/`,
`pipeline/` (checkpoint -> deploy file) and `commands/` (one file per CLI command).
"""

from reparam_cli._version import __version__

_API = {
    "convert_checkpoint": "pipeline.conversion", "verify_checkpoint": "pipeline.conversion",
    "init_checkpoint": "pipeline.conversion", "save_deploy": "pipeline.conversion",
    "ConvertOptions": "pipeline.options", "VerifyOptions": "pipeline.options",
    "load_training_model": "pipeline.training", "convert_stdio": "pipeline.stdio",
    "inspect_checkpoint": "pipeline.inspection", "run_batch": "pipeline.batch",
    "load_deploy": "pipeline.deploy", "deploy_skeleton": "pipeline.deploy", "read_metadata": "io.safetensors",
    "load_spec": "pipeline.specs", "ModelSpec": "core.spec",
    "reparameterize": "convert.engine", "ConversionReport": "convert.engine",
    "verify": "verification.equivalence", "VerifyResult": "verification.equivalence",
    "recipe": "blocks", "all_recipes": "blocks",
    "ReparamError": "errors", "VerificationFailed": "errors", "NotEquivalent": "errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'reparam_cli' has no attribute {name!r}")
