"""The ground floor: what every other layer may use, importing nothing of reparam above it.

* `algebra.py`: the math, in one place. Every paradigm (BN folding, branch addition, sequential
  convs, identity, average pooling, padding, concat, ...) is a function on a linear layer in
  canonical form (`Kernel`); recipes, the graph pass and ecosystems compose these.
* `shapeonly.py`: torch on the meta device from shapes alone (fast deploy skeletons).
* `spec.py`: the model spec as data (`ModelSpec`) and how it builds a model.
* `tensors.py`, `stats.py`, `messages.py`, `jsonio.py`: small helpers (parameter counts, finite
  checks, FLOP counting, one-line messages, strict JSON).
"""
