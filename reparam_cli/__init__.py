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

Every name here is a function or class (the verification module is `reparam_cli.verification`).
"""

from ._version import __version__

_API = {
    "convert_checkpoint": "pipeline", "verify_checkpoint": "pipeline", "init_checkpoint": "pipeline",
    "VerifyOptions": "pipeline", "load_training_model": "pipeline", "save_deploy": "pipeline",
    "convert_stdio": "pipes", "inspect_checkpoint": "inspection", "run_batch": "batch",
    "reparameterize": "engine", "ConversionReport": "engine",
    "verify": "verification", "VerifyResult": "verification",
    "load_deploy": "deploy", "read_metadata": "deploy",
    "load_spec": "spec", "ModelSpec": "spec",
    "recipe": "recipes", "all_recipes": "recipes",
    "ReparamError": "errors", "VerificationFailed": "errors", "NotEquivalent": "errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'reparam_cli' has no attribute {name!r}")
