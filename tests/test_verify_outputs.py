"""Verification of models whose outputs are tuples, lists, dicts or nested mixes of tensors."""

from __future__ import annotations

import torch
from torch import nn

from reparam_cli.blocks.repvgg import RepVGGBlock
from reparam_cli.convert.engine import reparameterize
from reparam_cli.verification.equivalence import tensor_leaves, verify

from .helpers import randomized


class Heads(nn.Module):
    """A detector-like model: a RepVGG trunk and a nested output (list of a tensor and a dict)."""

    def __init__(self):
        super().__init__()
        self.trunk = RepVGGBlock(4, 4)
        self.boxes = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.trunk(x)
        return [y.mean((2, 3)), {"boxes": self.boxes(y) * 1e-3, "extra": None, "scores": (y.sigmoid(),)}]


def test_tensor_leaves_names_every_tensor_by_its_path():
    out = [torch.zeros(1), {"a": torch.ones(2), "n": None, "t": (torch.ones(3), 5)}]
    assert [p for p, _ in tensor_leaves(out)] == ["output[0]", "output[1]['a']", "output[1]['t'][0]"]


def test_nested_outputs_every_leaf_compared_and_the_worst_named():
    model = randomized(Heads())
    deploy, report = reparameterize(model)
    result = verify(model, deploy, (2, 4, 8, 8), blocks=[(b.path, b.block_type) for b in report.converted])
    assert result.ok and result.max_rel_err < 1e-5

    # A small leaf (boxes, scaled by 1e-3) broken: each leaf is judged on its own magnitude, so the
    # error is not hidden by the larger leaves, and the report names it by its path.
    broken = reparameterize(model)[0]
    # (a new tensor: the deploy model shares untouched layers' storage with the training model)
    broken.boxes.bias = nn.Parameter(broken.boxes.bias.detach() + 1e-2)  # 1e-5 at the output: < rtol*max|scores|
    result = verify(model, broken, (2, 4, 8, 8))
    assert not result.ok
    assert result.worst_output == "output[1]['boxes']"
