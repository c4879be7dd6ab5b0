"""Shared fixtures: a tiny random ViT saved as a local weights file, and configs that use it."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from promptdml.config import Config, load_config

torch.set_num_threads(1)  # tiny test models run faster on one thread; the slow demo test sets its own

TINY = dict(name="vit_tiny_patch16_224", img_size=32, depth=2)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> str:
    """A 2-block ViT-Tiny (D=192) at 32 px with random weights, saved like a downloaded checkpoint."""
    torch.manual_seed(1234)
    vit = timm.create_model(TINY["name"], pretrained=False, num_classes=0, img_size=TINY["img_size"],
                            depth=TINY["depth"])
    for name, p in vit.named_parameters():  # non-zero biases so BitFit gradients are generic
        if name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.02)
    path = tmp_path_factory.mktemp("weights") / "vit_tiny_patch16_224.test.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return str(path)


def tiny_config(weights: str, **overrides) -> Config:
    base = {
        "model.backbone.name": TINY["name"], "model.backbone.img_size": TINY["img_size"],
        "model.backbone.depth": TINY["depth"], "model.backbone.weights": weights, "model.embed_dim": 16,
        "model.prompts.num_prompt": 3, "model.prompts.prompt_depth": 2, "model.prompts.num_p_prompt": 2,
        "model.prompts.p_prompt_depth": 2, "train.precision": "fp32", "train.device": "cpu",
        "train.progress": False, "data.num_workers": 0,
    }
    base.update(overrides)
    return load_config(None, base)


@pytest.fixture
def tiny_cfg(tiny_weights) -> Config:
    return tiny_config(tiny_weights)


@pytest.fixture
def single_process_env(monkeypatch):
    """No torchrun variables in the environment: a Trainer built here runs as one process."""
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def seeded_data_root(tmp_path):
    """12 classes x 4 images whose pixels depend only on their relative names (data_fixtures.write_seeded_classes)."""
    from data_fixtures import write_seeded_classes

    return write_seeded_classes(tmp_path / "imgs")
