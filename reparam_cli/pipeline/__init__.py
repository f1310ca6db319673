"""The pipeline: checkpoint -> training model -> deploy model -> verification -> file, as Python
functions that return plain dict reports (what `--json` prints). The CLI is a skin over these.

* `options.py`: ConvertOptions / VerifyOptions / FuseOptions (one object from command to worker).
* `specs.py`: resolving a `--spec` reference (built-ins, YAML, Python files, library prefixes).
* `training.py`: checkpoint + spec -> training model. `deploy.py`: `deploy_skeleton` (the one
  rebuild of a deploy model's structure), `load_deploy`, exported files compared.
* `conversion.py`: convert_checkpoint, verify_checkpoint, init_checkpoint, save_deploy, list_specs;
  `report.py`: the report's figures. `stdio.py`: `-` as input/output. `inspection.py`: inspect.
  `batch.py`: folders (parallel, resumable, shardable).
"""
