"""End to end: train a tiny model on a folder dataset, reload it, evaluate; bad inputs via the CLI."""

import json

import pytest
import torch
from conftest import tiny_config
from data_fixtures import make_folder, write_garbage, write_image

from promptdml.cli import main
from promptdml.data import build_splits
from promptdml.engine import Trainer, embed_records, load_model
from promptdml.engine.checkpoint import read_checkpoint
from promptdml.engine.device import resolve_device


@pytest.fixture
def folder_data(tmp_path):
    root = make_folder(tmp_path / "imgs", {f"class_{i:02d}": 4 for i in range(8)})
    for i in range(3):  # larger images so 32 px crops are meaningful
        write_image(root / "class_00" / f"big_{i}.jpg", size=(48, 40))
    write_image(root / "class_01" / "gray.png", size=(40, 40), mode="L")
    write_image(root / "class_02" / "alpha.png", size=(40, 40), mode="RGBA")
    write_garbage(root / "class_03" / "corrupt.jpg")
    return root


def _cfg(tiny_weights, root, tmp_path, **extra):
    overrides = {"data.dataset": "folder", "data.root": str(root), "data.batch_size": 4,
                 "data.samples_per_class": 2, "data.batches_per_epoch": 3, "train.epochs": 2,
                 "train.output_dir": str(tmp_path / "runs"), "train.run_name": "r", "eval.every": 1,
                 "eval.batch_size": 5, "optim.lr": 0.05}
    overrides.update(extra)
    return tiny_config(tiny_weights, **overrides)


def test_train_writes_run_dir_and_checkpoint_round_trip(tiny_weights, folder_data, tmp_path):
    cfg = _cfg(tiny_weights, folder_data, tmp_path)
    trainer = Trainer(cfg, echo=lambda s: None)
    assert any("corrupt.jpg" in p for p in trainer.splits.problems)  # reported, not silently dropped
    initial = {k: v.clone() for k, v in trainer.model.trainable_state().items()}
    result = trainer.fit()
    run = result.run_dir
    for name in ("config.yaml", "metrics.json", "log.csv", "training.png", "model.safetensors", "README.md"):
        assert (run / name).is_file(), name
    card = (run / "README.md").read_text()
    assert "VPTSP-G" in card and "vit_tiny_patch16_224" in card and "recall@1" in card
    assert f"{summary_params(run)['trainable']:,}" in card
    assert len((run / "log.csv").read_text().strip().splitlines()) == 1 + cfg.train.epochs
    summary = json.loads((run / "metrics.json").read_text())
    assert set(summary["test"]) >= {"recall@1", "recall@2", "recall@4", "recall@8", "map@r"}
    # training changed the trainable state, including the proxy container
    state = trainer.model.trainable_state()
    assert not torch.equal(state["proxies.container"], initial["proxies.container"])
    assert not torch.equal(state["shared_prompts.params.0"], initial["shared_prompts.params.0"])
    # the checkpoint holds only trainable weights + container: far smaller than the backbone
    tensors, stored_cfg, _ = read_checkpoint(run)
    assert set(tensors) == set(state)
    backbone_numel = sum(p.numel() for p in trainer.model.backbone.parameters())
    assert sum(t.numel() for t in tensors.values()) < backbone_numel
    assert stored_cfg == cfg
    # reload on a freshly built frozen backbone: identical embeddings and metrics
    device = resolve_device("cpu")
    model, _ = load_model(run, device=device)
    test = trainer.splits.test
    e1 = embed_records(trainer.model, test, cfg, device, None)
    e2 = embed_records(model, test, cfg, device, None)
    assert torch.equal(e1, e2)
    # the CLI evaluate command reproduces the reported test metrics
    assert main(["evaluate", "--run", str(run), "--no-progress"]) == 0
    reproduced = json.loads((run / "metrics_eval_test.json").read_text())
    for key, value in summary["test"].items():
        assert reproduced[key] == pytest.approx(value, abs=1e-12), key


def summary_params(run):
    return json.loads((run / "metrics.json").read_text())["parameters"]


def test_cli_train_and_info(tiny_weights, folder_data, tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  epochs: 5\n")
    args = ["train", "--config", str(cfg_file), "--epochs", "1", "--no-progress",
            "--set", "model.backbone.name=vit_tiny_patch16_224", "--set", "model.backbone.img_size=32",
            "--set", "model.backbone.depth=2", "--weights", tiny_weights, "--set", "model.embed_dim=8",
            "--set", "train.precision=fp32", "--set", "data.num_workers=0", "--dataset", "folder",
            "--data-root", str(folder_data), "--batch-size", "4", "--output-dir", str(tmp_path / "o"),
            "--name", "cli", "--set", "data.batches_per_epoch=2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "recall@1" in out and "map@r" in out
    saved = (tmp_path / "o" / "cli" / "config.yaml").read_text()
    assert "epochs: 1" in saved  # the flag won over the YAML
    assert main(["info", "--config", "cub200_small"]) == 0
    out = capsys.readouterr().out
    assert "class_prompts" in out and "trainable params:" in out and "|| all params:" in out


def test_cli_bad_inputs_give_clear_errors(tiny_weights, tmp_path, capsys):
    base = ["train", "--weights", tiny_weights, "--set", "model.backbone.name=vit_tiny_patch16_224",
            "--set", "model.backbone.depth=2", "--set", "model.backbone.img_size=32", "--no-progress"]
    assert main(base + ["--dataset", "folder", "--data-root", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "missing" in err and "Traceback" not in err
    assert main(base + ["--batch-size", "5", "--set", "data.samples_per_class=2"]) == 2
    assert "divisible" in capsys.readouterr().err
    assert main(base + ["--set", "optim.lrate=1"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    other = tmp_path / "w.safetensors"
    other.write_bytes(b"not a safetensors file")
    assert main(["info", "--config", "demo", "--set", "model.backbone.depth=2"]) == 0
    capsys.readouterr()
    root = make_folder(tmp_path / "d", {"a": 2, "b": 2, "c": 2, "d": 2})
    bad = ["train", "--dataset", "folder", "--data-root", str(root), "--weights", tiny_weights,
           "--set", "model.backbone.name=vit_small_patch16_224", "--set", "model.backbone.img_size=32",
           "--set", "model.backbone.depth=2", "--batch-size", "4", "--no-progress"]
    assert main(bad) == 2
    assert "does not fit architecture" in capsys.readouterr().err


def test_single_image_class_in_train_split_is_a_clear_error(tmp_path):
    from promptdml.config import load_config
    from promptdml.data import DataError

    root = make_folder(tmp_path / "d", {"a": 1, "b": 3, "c": 3, "d": 3})
    cfg = load_config(None, {"data.dataset": "folder", "data.root": str(root)})
    with pytest.raises(DataError, match="a"):
        build_splits(cfg.data)


def test_original_main_py_command_line(tiny_weights, tmp_path):
    """`python main.py --source_path ROOT --config configs/cub200_small.yaml` on the CUB-layout fixture."""
    import subprocess
    import sys
    from pathlib import Path

    from data_fixtures import make_cub200

    fixture = make_cub200(tmp_path / "data")
    repo = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, str(repo / "main.py"), "--source_path", str(fixture.root), "--config",
           str(repo / "configs" / "cub200_small.yaml"), "--gpu", "0", "--save_path", str(tmp_path / "runs"),
           "--set", "model.backbone.name=vit_tiny_patch16_224", "--set", f"model.backbone.weights={tiny_weights}",
           "--set", "model.backbone.img_size=32", "--set", "model.backbone.depth=2", "--set", "train.epochs=1",
           "--set", "data.batches_per_epoch=2", "--set", "data.batch_size=8", "--set", "data.num_workers=0",
           "--set", "train.progress=false", "--set", "train.run_name=cub", "--set", "model.embed_dim=16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "recall@1" in proc.stdout
    summary = json.loads((tmp_path / "runs" / "cub" / "metrics.json").read_text())
    assert summary["parameters"]["class_prompts"] == 100 * 2 * 3 * 192  # 100 CUB train classes, depth 2
