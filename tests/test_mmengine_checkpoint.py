"""A real mmengine checkpoint (mmengine's own save_checkpoint: meta, state_dict, optimizer,
param_schedulers, message_hub with HistoryBuffers, ema_state_dict) converts from the CLI without
--trust-pickle: only its tensors are needed.

`message_hub` pickles HistoryBuffer objects with bound methods (`builtins.getattr`), which
`torch.load(weights_only=True)` refuses and no allowlist can safely admit: this relies on the
restricted unpickler of reparam_cli.checkpoint (foreign objects read as inert placeholders)."""

from __future__ import annotations

import json

import pytest
import torch

from reparam_cli.core.tensors import randomize_batchnorm
from reparam_cli.pipeline.specs import load_spec

from .test_checkpoint_formats import run

pytest.importorskip("mmpretrain")


def test_mmengine_checkpoint_converts_without_trust_pickle(tmp_path):
    from mmengine.logging import MessageHub
    from mmengine.model import ExponentialMovingAverage
    from mmengine.runner import save_checkpoint

    ref = "mmpretrain:mobileone-s0_8xb32_in1k?head.num_classes=4"
    model = load_spec(ref).build().eval()
    with torch.no_grad():
        randomize_batchnorm(model, torch.Generator().manual_seed(0))
    hub = MessageHub.get_instance("reparam-test")
    hub.update_scalar("train/loss", 0.5)
    hub.update_info("epoch", 3)
    ema = ExponentialMovingAverage(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # The layout of mmengine's Runner.save_checkpoint (with the EMAHook: averaged weights swapped
    # into state_dict, the raw ones in ema_state_dict).
    checkpoint = {
        "meta": {"epoch": 3, "iter": 300, "seed": 0, "experiment_name": "run", "dataset_meta": {"classes": ("a", "b")}},
        "state_dict": model.state_dict(), "message_hub": hub.state_dict(), "optimizer": optimizer.state_dict(),
        "param_schedulers": [{"last_epoch": 3, "base_lrs": [0.1]}], "ema_state_dict": ema.state_dict(),
    }
    ckpt = tmp_path / "work_dirs" / "run" / "epoch_3.pth"
    ckpt.parent.mkdir(parents=True)
    save_checkpoint(checkpoint, str(ckpt))
    with pytest.raises(Exception, match="Unsupported global"):  # what makes it hard: not weights-only loadable
        torch.load(ckpt, weights_only=True)

    result = run("convert", ckpt, "--spec", ref, "--input-shape", "1,3,64,64", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["native_blocks"] == ["MobileOne"] and report["max_rel_err"] < 1e-5
    assert any("message_hub" in note for note in report.get("notes", [])), report.get("notes")
