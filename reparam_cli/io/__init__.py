"""Files: what reparam reads and writes, and how it writes them safely.

* `sniff.py`: what a file is, from its first bytes (torch-free).
* `checkpoint.py` + `unpickle.py`: training checkpoints, unwrapped, read without running code
  (weights_only / a restricted unpickler) unless the user trusts the file.
* `safetensors.py`: the safetensors format, read and written in one place; `metadata.py`:
  reparam's keys in its header (torch-free).
* `export.py` (writers: TorchScript, pt2, ONNX; `formats.py` names them torch-free) and
  `runtimes.py` (the same files loaded back in their runtimes).
* `safeio.py` (atomic, no-replace publishing; input checks), `signals.py` (signals as
  exceptions, temporaries removed), `plot.py` (the per-block error plot).
"""
