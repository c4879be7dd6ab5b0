"""The package's public names: exported, resolvable, documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import promptdml

DOCS = Path(__file__).resolve().parent.parent / "docs" / "python.md"


def test_every_public_name_resolves_and_dir_shows_them():
    for name in promptdml.__all__:
        assert getattr(promptdml, name) is not None, name
    shown = dir(promptdml)
    for name in ("load_config", "train", "evaluate_run", "retrieval_metrics", "load", "build_index", "load_index"):
        assert name in shown
    with pytest.raises(AttributeError):
        promptdml.no_such_name  # noqa: B018


def test_import_is_light():
    code = "import sys, promptdml; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_load_config_accepts_shipped_names(tmp_path):
    demo = promptdml.load_config("demo")
    assert demo.model.backbone.name == "vit_small_patch14_dinov2.lvd142m" and demo.train.epochs == 8
    assert promptdml.load_config("configs/cub200_small.yaml") == promptdml.load_config("cub200_small")
    own = tmp_path / "mine.yaml"
    own.write_text("train:\n  epochs: 3\n")
    assert promptdml.load_config(own, {"optim.lr": 0.01}).train.epochs == 3
    with pytest.raises(promptdml.ConfigError, match="Did you mean 'demo'"):
        promptdml.load_config("dmeo")
    assert "demo" in promptdml.shipped_configs()


def test_the_python_page_covers_the_api():
    text = DOCS.read_text()
    for name in ("load_config", "train(", "evaluate_run", "retrieval_metrics", "load(", "embed(", "build_index",
                 "load_index", ".search("):
        assert name in text, name
