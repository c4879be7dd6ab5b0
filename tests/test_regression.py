"""Same numbers: fixed-seed deterministic runs compared bit for bit with values stored from an earlier version.

Each case trains a shipped config (``demo``, ``cub200_small`` and some of their variants) shrunk to the test
fixtures' tiny random ViT, on CPU, deterministic, for two short epochs, and compares

- a SHA-256 of every trainable tensor after training (what ``model.safetensors`` stores),
- the final metrics and each epoch's logged loss, exactly (``repr`` of the floats),
- the names of the files the run directory holds,

with ``tests/regression_values.json``. The stored values were produced by the code before the trainer,
optimiser and registry refactor (issue 20); a refactor that changes no behaviour keeps them.

Regenerate only for an intended change of numbers: ``PROMPTDML_REGEN=1 pytest tests/test_regression.py``
(and say why in the commit).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import TINY
from data_fixtures import write_image

from promptdml.config import load_config
from promptdml.engine import Trainer

STORE = Path(__file__).resolve().parent / "regression_values.json"

SHRINK = {  # the tiny backbone and a few short steps; everything else comes from the shipped config
    "model.backbone.name": TINY["name"], "model.backbone.img_size": TINY["img_size"],
    "model.backbone.depth": TINY["depth"], "model.embed_dim": 16,
    "train.precision": "fp32", "train.device": "cpu", "train.progress": False, "train.deterministic": True,
    "train.epochs": 2, "train.tensorboard": False, "data.num_workers": 0, "data.batch_size": 8,
    "data.batches_per_epoch": 2, "eval.batch_size": 16,
    # the stored values come from the two-pass path; the fused one equals it up to rounding (tests/test_fused.py)
    "model.backbone.fused_branches": False,
}

CASES = {
    # demo: VPTSP-G with SGD on the procedural demo data (memory bank auto = off)
    "demo": ("demo", {"data.demo_classes": 12, "data.demo_images_per_class": 4, "data.demo_image_size": 32,
                      "model.prompts.num_prompt": 3, "model.prompts.prompt_depth": 2}),
    # cub200_small-shaped: semantic proxies + memory bank + class prompts + BitFit + deep VPT; validation split,
    # per-epoch evaluation and selection
    "cub200_small": ("cub200_small", {"data.dataset": "folder", "model.memory_bank": "on",
                                      "data.val_ratio": 0.25, "eval.every": 1, "model.prompts.num_prompt": 3,
                                      "model.prompts.prompt_depth": 2, "model.prompts.num_p_prompt": 2,
                                      "model.prompts.p_prompt_depth": 2}),
    # the same with AdamW, clipping, warm-ups and a backbone learning-rate scale (every optimiser path)
    "cub200_small_adamw": ("cub200_small", {
        "data.dataset": "folder", "model.memory_bank": "on", "model.prompts.num_prompt": 3,
        "model.prompts.prompt_depth": 2, "model.prompts.num_p_prompt": 2, "model.prompts.p_prompt_depth": 2,
        "optim.optimizer": "adamw", "optim.grad_clip": 0.5, "optim.warmup_epochs": 1.0,
        "optim.head_warmup_epochs": 0.5, "optim.backbone_lr_scale": 0.5, "optim.weight_decay": 0.01,
        "loss.proxy_range": "in_batch", "train.log_steps": True}),
    # the same without the bank, clipped SGD, data-dependent initialisation
    "cub200_small_nobank": ("cub200_small", {
        "data.dataset": "folder", "model.memory_bank": "off", "model.prompts.num_prompt": 3,
        "model.prompts.prompt_depth": 2, "model.prompts.num_p_prompt": 2, "model.prompts.p_prompt_depth": 2,
        "optim.grad_clip": 0.5, "model.head_init": "centered", "model.proxy.bias_init": "class_mean",
        "model.proxy.container_init": "class_mean"}),
    # PEFT baselines and the other loss
    "demo_lora": ("demo_lora", {"data.demo_classes": 12, "data.demo_images_per_class": 4,
                                "data.demo_image_size": 32, "model.lora.rank": 2}),
    "demo_adapter": ("demo_adapter", {"data.demo_classes": 12, "data.demo_images_per_class": 4,
                                      "data.demo_image_size": 32, "model.adapter.bottleneck": 4,
                                      "loss.name": "norm_softmax"}),
    "demo_full": ("demo_full", {"data.demo_classes": 12, "data.demo_images_per_class": 4,
                                "data.demo_image_size": 32}),
}


def _digest(t: torch.Tensor) -> str:
    t = t.detach().to("cpu").contiguous()
    return hashlib.sha256(str(t.dtype).encode() + str(tuple(t.shape)).encode() + t.numpy().tobytes()).hexdigest()


def _folder(root: Path, classes: int = 16, per_class: int = 4) -> Path:
    """Class folders of random images whose pixels depend on the class and index only (not on the path)."""
    for c in range(classes):
        for j in range(per_class):
            write_image(root / f"c{c:02d}" / f"{j:03d}.png", size=(12, 10), seed=1000 * c + j)
    return root


def _files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())


def run_case(name: str, weights: str, tmp: Path) -> dict:
    config, extra = CASES[name]
    overrides = {**SHRINK, "model.backbone.weights": weights, "train.output_dir": str(tmp / "runs"),
                 "train.run_name": name, **extra}
    if overrides.get("data.dataset") == "folder":
        overrides["data.root"] = str(_folder(tmp / "imgs"))
    else:
        overrides["data.root"] = str(tmp / "demo-cache")
    torch.set_num_threads(1)
    trainer = Trainer(load_config(config, overrides), echo=lambda _: None)
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    state = trainer.model.trainable_state()
    return {
        "tensors": {k: _digest(v) for k, v in sorted(state.items())},
        "metrics": {k: repr(v) for k, v in sorted(result.metrics.items())},
        "losses": [repr(r["loss"]) for r in result.history],
        "val": [repr(r.get("val_map@r")) for r in result.history],
        "files": _files(result.run_dir),
    }


@pytest.mark.parametrize("name", sorted(CASES))
def test_fixed_seed_run_matches_stored_values(name, tiny_weights, tmp_path):
    got = run_case(name, tiny_weights, tmp_path)
    if os.environ.get("PROMPTDML_REGEN"):
        stored = json.loads(STORE.read_text()) if STORE.is_file() else {}
        stored[name] = got
        STORE.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
        return
    expected = json.loads(STORE.read_text())[name]
    assert got["files"] == expected["files"]
    assert got["metrics"] == expected["metrics"]
    assert got["losses"] == expected["losses"]
    assert got["val"] == expected["val"]
    assert set(got["tensors"]) == set(expected["tensors"])
    changed = [k for k in expected["tensors"] if got["tensors"][k] != expected["tensors"][k]]
    assert not changed, f"trainable tensors differ bitwise: {changed}"
