"""One command-line shape: every flag has help and acts, --version, errors that name the flag to change."""

from __future__ import annotations

import argparse
import json

import pytest
from conftest import tiny_config
from data_fixtures import make_folder, write_garbage

import promptdml
from promptdml.cli import COMMAND_FLAGS, FLAGS, build_parser, command_overrides, main
from promptdml.engine import Trainer

TINY_SET = ["--set", "model.backbone.name=vit_tiny_patch16_224", "--set", "model.backbone.img_size=32",
            "--set", "model.backbone.depth=2", "--set", "model.embed_dim=8", "--set", "train.precision=fp32",
            "--set", "data.num_workers=0", "--set", "train.tensorboard=false"]


def _subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    out: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                full = f"{prefix} {name}".strip()
                out[full] = sub
                out.update(_subcommands(sub, full))
    return out


def test_every_flag_of_every_command_has_help_text():
    parser = build_parser()
    commands = _subcommands(parser)
    assert {"train", "evaluate", "info", "demo", "data check", "embed", "index build", "search", "export"} <= set(
        commands)
    missing = []
    for name, sub in [("promptdml", parser), *commands.items()]:
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"flags without help text: {missing}"


def test_config_flags_set_their_keys_and_nothing_else_is_offered():
    """Each command offers --set and exactly the config flags that act for it; each sets its config key."""
    commands = _subcommands(build_parser())
    values = {"int": "3", "float": "0.25", "str": "x"}
    for command, names in COMMAND_FLAGS.items():
        sub = commands[command]
        offered = {a.dest for a in sub._actions if a.dest in FLAGS}
        assert offered == set(names), command
        assert any(a.dest == "overrides" for a in sub._actions), f"{command} has no --set"
        for name in names:
            flag = FLAGS[name]
            raw = flag.choices[-1] if flag.choices else values[getattr(flag.type, "__name__", "str")]
            argv = command.split() + [flag.option, raw]
            if command == "evaluate":
                argv += ["--run", "r"]
            if command == "info":
                argv += ["--config", "demo"]
            args = build_parser().parse_args(argv)
            assert command_overrides(args) == {flag.key: flag.type(raw)}, (command, flag.option)


def test_flags_that_did_nothing_are_gone():
    commands = _subcommands(build_parser())

    def options(command):
        return {o for a in commands[command]._actions for o in a.option_strings}

    assert not {"--weights", "--device"} & options("data check")
    assert not {"--weights", "--device"} & options("info")
    assert not {"--data", "--root"} & (options("evaluate") | options("data check"))
    assert {"--set", "--precision", "--batch-size", "--data-root", "--weights", "--device"} <= options("evaluate")


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"promptdml {promptdml.__version__}"


@pytest.fixture(scope="module")
def tiny_run(tiny_weights, tmp_path_factory):
    base = tmp_path_factory.mktemp("cli_run")
    root = make_folder(base / "imgs", {f"class_{i:02d}": 4 for i in range(8)})
    cfg = tiny_config(tiny_weights, **{
        "data.dataset": "folder", "data.root": str(root), "data.batch_size": 4, "data.batches_per_epoch": 2,
        "train.epochs": 1, "train.output_dir": str(base / "runs"), "train.run_name": "r", "eval.batch_size": 5,
        "train.tensorboard": False, "train.plot": False})
    return Trainer(cfg, echo=lambda s: None).fit().run_dir


def test_evaluate_takes_set_precision_and_batch_size(tiny_run, tmp_path, capsys):
    out = tmp_path / "m.json"
    code = main(["evaluate", "--run", str(tiny_run), "--set", "eval.recall_ks=[1,10]", "--precision", "fp32",
                 "--batch-size", "3", "--no-progress", "--out", str(out)])
    assert code == 0
    metrics = json.loads(out.read_text())
    assert {"recall@1", "recall@10"} <= set(metrics) and "recall@2" not in metrics
    assert "recall@10" in capsys.readouterr().out
    assert main(["evaluate", "--run", str(tiny_run), "--set", "eval.recal_ks=[1]", "--no-progress"]) == 2
    assert "eval.recall_ks" in capsys.readouterr().err


def test_resume_names_the_options_it_ignores(tiny_run, capsys):
    # --resume continues with the run's own config: moved files and the device may change (tests/test_faults.py),
    # every other option is named as ignored, never dropped silently
    assert main(["train", "--resume", str(tiny_run), "--epochs", "3", "--set", "optim.lr=1"]) == 0
    err = capsys.readouterr().err
    assert "train.epochs" in err and "optim.lr" in err and "ignored" in err and "Traceback" not in err


def test_small_folder_error_names_the_batch_size_flag(tiny_weights, tmp_path, capsys):
    root = make_folder(tmp_path / "few", {f"c{i}": 3 for i in range(8)})  # 4 training classes
    code = main(["train", "--config", "demo", "--dataset", "folder", "--data-root", str(root), "--weights",
                 tiny_weights, "--output-dir", str(tmp_path / "runs"), "--no-progress", *TINY_SET])
    assert code == 2
    err = capsys.readouterr().err
    assert "--batch-size 8" in err and "only 4" in err


def test_data_check_lists_every_problem_then_fails(tmp_path, capsys):
    root = make_folder(tmp_path / "d", {"a": 1, "b": 3, "c": 3, "d": 3, "e": 3, "f": 3})
    write_garbage(root / "b" / "broken.jpg")
    code = main(["data", "check", "--dataset", "folder", "--data-root", str(root), "--no-progress"])
    assert code == 2
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.out  # the other problem is still listed
    assert "blocking: 1" in captured.out and "single image" in captured.out
    assert "note:" in captured.out and "--batch-size 6" in captured.out  # 3 training classes x 2 images
    assert "would stop training" in captured.err
    # the same folder without the single-image class passes (the note is not an error)
    (root / "a" / next(p.name for p in (root / "a").iterdir())).unlink()
    (root / "a").rmdir()
    assert main(["data", "check", "--dataset", "folder", "--data-root", str(root), "--batch-size", "4",
                 "--no-progress"]) == 0
    assert "problems: 1" in capsys.readouterr().out


def test_demo_header_and_model_card_say_1_epoch(tiny_weights, tmp_path, capsys):
    code = main(["demo", "--weights", tiny_weights, "--output-dir", str(tmp_path), "--epochs", "1", "--no-progress",
                 *TINY_SET, "--set", "data.demo_classes=8", "--set", "data.demo_images_per_class=4",
                 "--set", "data.demo_image_size=32", "--set", f"data.root={tmp_path / 'demo_data'}",
                 "--batch-size", "4", "--set", "data.batches_per_epoch=1", "--set", "eval.batch_size=16"])
    assert code == 0
    out = capsys.readouterr().out
    assert "1 epoch" in out and "1 epochs" not in out
    card = (tmp_path / "demo" / "README.md").read_text()
    assert "1 epoch," in card and "1 epochs" not in card
    summary = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert summary["backbone_weights"].startswith("local file") and "model.backbone.weights" in \
        summary["backbone_weights"]


def test_progress_bars_only_when_enabled_and_on_a_terminal(monkeypatch):
    import io
    import sys

    from promptdml.progress import bars_visible, progress_bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a pipe or a log file
    assert not bars_visible(True) and progress_bar(range(3), enabled=True).disable
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert bars_visible(True) and not bars_visible(False)
    assert progress_bar(range(3), enabled=False).disable
    bar = progress_bar(range(3), enabled=True, desc="metrics")
    assert not bar.disable
    assert list(bar) == [0, 1, 2]
