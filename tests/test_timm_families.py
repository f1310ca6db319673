"""timm families whose blocks' own methods leave children for later (GhostNetV3's bottleneck
fuses its depthwise conv but not its GhostModuleV3s; SHViT and EfficientViM fuse through nested
fuse() methods): reparam's deploy model has no more BatchNorms and parameters than timm's own
`reparameterize_model`, and the same outputs. The full sweep over every timm family is
scripts/timm_families.py (table in docs/timm-families.md)."""

from __future__ import annotations

import pytest
import torch

from reparam_cli.core.tensors import count_parameters
from reparam_cli.convert.engine import reparameterize
from reparam_cli.core.tensors import randomize_batchnorm
from reparam_cli.pipeline.specs import load_spec
from reparam_cli.verification.equivalence import verify

from .helpers import batchnorms

timm = pytest.importorskip("timm")

# (spec, block types reparam reports: the outermost ones and the children searched again)
MODELS = [
    ("timm:ghostnetv3_050?num_classes=10", {"GhostBottleneckV3", "GhostModuleV3"}),
    ("timm:shvit_s1?num_classes=10", {"Conv2dNorm", "NormLinear", "Residual"}),
    ("timm:efficientvim_m1?num_classes=10", {"EfficientViMBlock", "ConvLayer2d", "PatchMerging"}),
]


@pytest.mark.parametrize("ref,blocks", MODELS, ids=[m[0].split(":")[1].split("?")[0] for m in MODELS])
def test_timm_family_matches_timms_own_reparameterize_model(ref, blocks):
    from timm.utils import reparameterize_model

    torch.manual_seed(0)
    train = load_spec(ref).build().eval()
    with torch.no_grad():
        randomize_batchnorm(train, torch.Generator().manual_seed(0))
    deploy, report = reparameterize(train)
    assert set(report.blocks) == blocks and report.notes == []
    # Children converted after (inside) their parent's own method: the search went all the way down.
    assert any(p.startswith(q + ".") for p in report.paths for q in report.paths if q)
    theirs = reparameterize_model(train).eval()
    assert batchnorms(deploy) <= batchnorms(theirs) < batchnorms(train)
    assert count_parameters(deploy) <= count_parameters(theirs)
    result = verify(train, deploy, (1, 3, 64, 64), blocks=[(b.path, b.block_type) for b in report.converted])
    assert result.ok and result.max_rel_err < 1e-5, result
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref_out = deploy(x), theirs(x)
    assert ((ours - ref_out).abs().max() / ref_out.abs().max()).item() < 1e-5


def test_layers_a_blocks_own_method_leaves_are_folded_inside_it():
    """timm RepGhost's reparameterize() merges its fusion branch into the cheap depthwise conv but
    keeps the primary conv+BN: the graph pass folds those inside each block (timm's own fuse leaves
    31 BatchNorms there), never across the block's boundary, so every block still matches its
    training block on the input that block saw."""
    from timm.utils import reparameterize_model

    torch.manual_seed(0)
    train = load_spec("timm:repghostnet_050?num_classes=10").build().eval()
    with torch.no_grad():
        randomize_batchnorm(train, torch.Generator().manual_seed(0))
    deploy, report = reparameterize(train)
    assert set(report.blocks) == {"RepGhostModule"}
    theirs = reparameterize_model(train).eval()
    assert batchnorms(deploy) == 0 < batchnorms(theirs)
    assert count_parameters(deploy) < count_parameters(theirs)
    assert not [r for r in report.remaining if r.kind in ("batchnorm", "native-method")]
    blocks = [(b.path, b.block_type) for b in report.converted]
    result = verify(train, deploy, (1, 3, 64, 64), blocks=blocks)
    assert result.ok and result.max_rel_err < 1e-5, result
    assert len(result.blocks) == len(blocks) and all(b.ok and b.max_rel_err < 1e-5 for b in result.blocks)
