"""promptdml tune: search-space validation, the study on the validation split, resuming, the best config."""

import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml
from conftest import tiny_config
from data_fixtures import make_folder, write_garbage

from promptdml.cli import main
from promptdml.config import CONFIG_DIR, ConfigError, load_config, save_config

optuna = pytest.importorskip("optuna")

from promptdml import tune as tune_mod  # noqa: E402
from promptdml.tune import DEFAULT_SPACE, TuneError, TuneInterrupted, load_space, parse_space, tune  # noqa: E402

SPACE = {"optim.lr": {"low": 1e-3, "high": 5e-2, "log": True}, "model.proxy.proxy_bias_ratio": {"low": 0.3, "high": 0.9}}


@pytest.fixture
def data_root(tmp_path):
    """16 classes: 8 training classes (2 of them validation at val_ratio 0.2), 8 test classes."""
    return make_folder(tmp_path / "imgs", {f"c{i:02d}": 4 for i in range(16)})


def _cfg(tiny_weights, root, **extra):
    overrides = {"data.dataset": "folder", "data.root": str(root), "data.batch_size": 4,
                 "data.samples_per_class": 2, "data.batches_per_epoch": 2, "train.epochs": 2,
                 "eval.batch_size": 16, "train.tensorboard": False, "train.seed": 3}
    overrides.update(extra)
    return tiny_config(tiny_weights, **overrides)


def _quiet(_):
    pass


def _states(out):
    study = optuna.load_study(study_name=tune_mod.STUDY_NAME, storage=f"sqlite:///{out / 'study.db'}")
    return study, [t.state.name for t in study.trials]


def _rows(out):
    with open(out / "trials.csv") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------- space
def test_default_space_is_valid_for_the_shipped_configs():
    for name in ("demo", "cub200_small"):
        params = load_space(None, load_config(CONFIG_DIR / f"{name}.yaml"))
        assert {p.key for p in params} >= {"optim.lr", "model.proxy.proxy_bias_ratio", "optim.head_warmup_epochs"}
    assert load_space("vptsp_g", load_config(None)) == load_space(DEFAULT_SPACE, load_config(None))


@pytest.mark.parametrize("space, message", [
    ({"optim.lrate": {"low": 0.1, "high": 1}}, "unknown config key 'optim.lrate'.*optim.lr"),
    ({"model.proxy.lambda_": {"low": 0.3, "high": 0.9}}, "unknown config key 'model.proxy.lambda_'"),
    ({"optim": {"lr": {"low": 1, "high": 2}}}, "'optim' is a config section.*dotted"),
    ({"optim.lr": {"low": 0.1, "hgh": 1}}, "unknown field 'hgh'.*'high'"),
    ({"optim.lr": {"low": 0.1}}, "needs both low and high \\(missing high\\)"),
    ({"optim.lr": {"low": 0.1, "high": 0.01}}, "low \\(0.1\\) must be smaller than high \\(0.01\\)"),
    ({"optim.lr": {"low": 0, "high": 0.01, "log": True}}, "log-scale range needs low > 0"),
    ({"optim.lr": {"low": "fast", "high": 0.01}}, "expected a number, got 'fast'"),
    ({"model.proxy.proxy_bias_ratio": {"low": 0.5, "high": 1.5}},
     "proxy_bias_ratio = 1.5 .* invalid config: model.proxy.proxy_bias_ratio must be in \\[0, 1\\]"),
    ({"optim.head_warmup_epochs": {"choices": [0, 5]}}, "head_warmup_epochs = 5.0 .*train.epochs=2"),
    ({"optim.optimizer": {"low": 0, "high": 1}}, "optim.optimizer is a str key; list its values"),
    ({"optim.optimizer": {"choices": ["sgd", "adam"]}}, "'adam' is not one of .*'adamw'"),
    ({"optim.optimizer": ["sgd", "adamw"]}, "write a list of values as \\{choices"),
    ({"optim.optimizer": {"choices": []}}, "non-empty list"),
    ({"data.val_ratio": {"low": 0.1, "high": 0.3}}, "data.val_ratio cannot be searched"),
    ({"eval.recall_ks": {"choices": [1, 2]}}, "list-valued key"),
    ({}, "must map config keys"),
])
def test_bad_search_spaces_are_explained(space, message):
    base = load_config(None, {"train.epochs": 2})
    with pytest.raises(ConfigError, match=message):
        parse_space(space, base)


def test_space_file_values_are_typed(tmp_path):
    f = tmp_path / "space.yaml"
    f.write_text("optim.lr: {low: 1e-4, high: 1e-2, log: true}\nmodel.prompts.num_prompt: {low: 2, high: 8, step: 2}\n"
                 "optim.head_warmup_epochs: {choices: [0, 1]}\n")  # YAML reads 1e-4 as a string: still a number
    params = {p.key: p for p in load_space(f, load_config(None))}
    assert (params["optim.lr"].kind, params["optim.lr"].low, params["optim.lr"].log) == ("float", 1e-4, True)
    assert (params["model.prompts.num_prompt"].kind, params["model.prompts.num_prompt"].step) == ("int", 2)
    assert params["optim.head_warmup_epochs"].choices == (0.0, 1.0)


def test_cli_bad_space_and_missing_optuna_are_clear_errors(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim.lrate: {low: 0.1, high: 1}\n")
    assert main(["tune", "--space", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "optim.lr" in err and "Traceback" not in err
    assert main(["tune", "--space", "no_such_space", "--out", str(tmp_path / "o")]) == 2
    assert "shipped: vptsp_g" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    assert main(["tune", "--trials", "1", "--out", str(tmp_path / "o")]) == 2
    assert 'pip install "promptdml[tune]"' in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- study
def test_tune_on_validation_only_writes_reports_and_a_trainable_best_config(tiny_weights, data_root, tmp_path,
                                                                            monkeypatch, capsys):
    from promptdml.engine import evaluator

    for cls in range(8, 16):  # every test image unreadable: tuning must not notice
        for p in (data_root / f"c{cls:02d}").iterdir():
            write_garbage(p)
    from promptdml import data as data_pkg

    splits_built, evaluated = [], []
    real_build, real_eval = data_pkg.build_splits, evaluator.evaluate

    def spy_build(cfg, *args, **kwargs):
        splits_built.append(kwargs.get("with_test", True))
        return real_build(cfg, *args, **kwargs)

    def spy_eval(model, splits, cfg, device, dtype, split="test", *args, **kwargs):
        evaluated.append(split)
        return real_eval(model, splits, cfg, device, dtype, split, *args, **kwargs)

    monkeypatch.setattr("promptdml.data.build_splits", spy_build)
    monkeypatch.setattr("promptdml.engine.trainer.evaluate", spy_eval)
    out = tmp_path / "tune"
    lines = []
    result = tune(_cfg(tiny_weights, data_root), parse_space(SPACE, load_config(None)), trials=3, out_dir=out,
                  echo=lines.append)
    assert splits_built == [False]  # built once, without the test split
    assert evaluated and set(evaluated) == {"val"}  # every evaluation on the validation split
    assert any("data.val_ratio is 0" in line and "20%" in line for line in lines)
    _, states = _states(out)
    assert states.count("COMPLETE") + states.count("PRUNED") == 3 and len(states) == 3
    rows = _rows(out)
    assert [r["number"] for r in rows] == ["0", "1", "2"]
    assert set(rows[0]) >= {"state", "val_map@r", "epochs_run", "seconds", "optim.lr", "model.proxy.proxy_bias_ratio"}
    for r in rows:
        log = (tmp_path / "tune" / "trials" / f"trial_{int(r['number']):04d}" / "log.csv").read_text()
        assert "val_map@r" in log.splitlines()[0] and "test_" not in log
        assert int(r["epochs_run"]) == len(log.strip().splitlines()) - 1
    best_row = max((r for r in rows if r["state"] == "COMPLETE"), key=lambda r: float(r["val_map@r"]))
    assert result.best_trial == int(best_row["number"]) and result.best_value == pytest.approx(float(best_row["val_map@r"]))
    assert (out / "val_map_r.png").stat().st_size > 0
    importance = json.loads((out / "importance.json").read_text())
    assert "note" in importance and (set(importance["importance"]) <= set(SPACE))
    # the best config: the base config with the best trial's values and the tuned validation split
    best = load_config(out / "best.yaml")
    assert best.optim.lr == pytest.approx(float(best_row["optim.lr"]))
    assert best.model.proxy.proxy_bias_ratio == pytest.approx(float(best_row["model.proxy.proxy_bias_ratio"]))
    assert best.data.val_ratio == 0.2 and best.train.output_dir == "runs" and best.train.run_name == ""
    monkeypatch.undo()
    for cls in range(8, 16):  # train it for real (the test split is needed now)
        make_folder(data_root, {f"c{cls:02d}": 4})
    capsys.readouterr()
    assert main(["train", "--config", str(out / "best.yaml"), "--epochs", "1", "--output-dir", str(tmp_path / "r"),
                 "--name", "best"]) == 0
    assert "map@r" in capsys.readouterr().out
    summary = json.loads((tmp_path / "r" / "best" / "metrics.json").read_text())
    assert summary["test"]["map@r"] >= 0 and "val" in summary


def test_pruned_trials_and_too_few_for_importance(tiny_weights, data_root, tmp_path):
    out = tmp_path / "tune"
    lines = []
    # a pruner that stops every trial at its first reported epoch
    result = tune(_cfg(tiny_weights, data_root, **{"train.epochs": 3}), parse_space(SPACE, load_config(None)),
                  trials=2, out_dir=out, echo=lines.append, pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    rows = _rows(out)
    assert [(r["state"], r["epochs_run"]) for r in rows] == [("PRUNED", "1"), ("PRUNED", "1")]
    assert all(float(r["val_map@r"]) >= 0 for r in rows)  # the last reported value
    assert result.best_config is None and not (out / "best.yaml").exists()
    assert any("no trial has completed yet" in line for line in lines)
    assert any("importance needs at least 2 completed trials (have 0)" in line for line in lines)
    assert json.loads((out / "importance.json").read_text())["importance"] == {}


def test_failing_trials_are_recorded_and_a_run_of_failures_stops_the_search(tiny_weights, data_root, tmp_path,
                                                                              monkeypatch):
    from promptdml.engine import trainer as T

    def diverge(self, evaluate_before=None, on_epoch=None):
        raise T.TrainingError("the loss was non-finite for 20 consecutive steps (epoch 1)")

    monkeypatch.setattr(T.Trainer, "fit", diverge)
    out = tmp_path / "t"
    with pytest.raises(TuneError, match="3 trials in a row failed .*non-finite.*Narrow the search space"):
        tune(_cfg(tiny_weights, data_root), parse_space(SPACE, load_config(None)), trials=5, out_dir=out,
             echo=_quiet)
    rows = _rows(out)
    assert [r["state"] for r in rows] == ["FAIL"] * 3 and all("non-finite" in r["note"] for r in rows)


def test_a_data_problem_stops_before_the_study_starts(tiny_weights, tmp_path):
    from promptdml.data import DataError

    root = make_folder(tmp_path / "few", {f"c{i}": 3 for i in range(8)})  # 4 training classes
    cfg = _cfg(tiny_weights, root)
    with pytest.raises(DataError, match="val_ratio=0.2 of 4 training classes"):
        tune(cfg, parse_space(SPACE, cfg), trials=1, out_dir=tmp_path / "t", echo=_quiet)
    # fixed with a larger validation share, the same folder works
    cfg.data.val_ratio = 0.5
    tune(cfg, parse_space(SPACE, cfg), trials=1, out_dir=tmp_path / "t", echo=_quiet)
    assert [r["state"] for r in _rows(tmp_path / "t")] == ["COMPLETE"]


def test_timeout_stops_starting_trials(tiny_weights, data_root, tmp_path, monkeypatch):
    clock = iter(range(0, 10**6, 100))  # every reading of the clock is 100 s later
    monkeypatch.setattr(tune_mod, "_clock", lambda: next(clock))
    lines = []
    tune(_cfg(tiny_weights, data_root), parse_space(SPACE, load_config(None)), trials=5, out_dir=tmp_path / "t",
         timeout=150, echo=lines.append)
    assert len(_rows(tmp_path / "t")) == 1
    assert any("--timeout 150 s reached" in line for line in lines)


KILL_SCRIPT = textwrap.dedent('''
    """Run a tune study and SIGKILL the process in the middle of trial 1 (after its first epoch)."""
    import os, signal, sys
    from promptdml.config import load_config
    from promptdml.engine import trainer as T
    from promptdml.tune import parse_space, tune

    real_fit = T.Trainer.fit

    def fit(self, evaluate_before=None, on_epoch=None):
        def hook(row):
            on_epoch(row)
            if self.run_dir.name == "trial_0001" and row["epoch"] == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_fit(self, evaluate_before, hook)

    T.Trainer.fit = fit
    cfg = load_config(sys.argv[1])
    tune(cfg, parse_space({SPACE!r}, cfg), trials=3, out_dir=sys.argv[2])
''')


def test_interrupted_study_resumes_and_keeps_earlier_trials(tiny_weights, data_root, tmp_path, monkeypatch):
    cfg = _cfg(tiny_weights, data_root, **{"train.epochs": 3})
    save_config(cfg, tmp_path / "base.yaml")
    out = tmp_path / "tune"
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT.replace("{SPACE!r}", repr(SPACE)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "base.yaml"), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]  # killed hard: no chance to clean up
    study, states = _states(out)
    assert states == ["COMPLETE", "RUNNING"]
    first = study.trials[0]

    # 2nd run: Ctrl-C during trial 2 -> that trial fails, the command stops and says how to continue
    from promptdml.engine import trainer as T

    real_step = T.Trainer.train_step

    def interrupt(self, images, labels):
        if self.run_dir.name == "trial_0002":
            raise KeyboardInterrupt
        return real_step(self, images, labels)

    monkeypatch.setattr(T.Trainer, "train_step", interrupt)
    lines = []
    with pytest.raises(TuneInterrupted, match="Rerun the same command"):
        tune(cfg, parse_space(SPACE, cfg), trials=3, out_dir=out, echo=lines.append)
    assert any("trial 1 was interrupted" in line and "marked failed" in line for line in lines)
    _, states = _states(out)
    assert states == ["COMPLETE", "FAIL", "FAIL"]
    monkeypatch.undo()

    # 3rd run: the study carries on to 3 completed + pruned trials; the first trial is kept as it was
    result = tune(cfg, parse_space(SPACE, cfg), trials=3, out_dir=out, echo=_quiet)
    study, states = _states(out)
    assert states[:3] == ["COMPLETE", "FAIL", "FAIL"]
    assert sum(s in ("COMPLETE", "PRUNED") for s in states) == 3 and len(states) == 5
    assert (study.trials[0].value, study.trials[0].params) == (first.value, first.params)
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == 5  # no redrawn values
    rows = _rows(out)
    assert [r["note"] for r in rows[1:3]] == ["interrupted", "interrupted"]
    assert (tmp_path / "tune" / "trials" / "trial_0001" / "log.csv").is_file()  # its run directory is kept
    assert result.best_trial in (0, 3, 4)
    # a 4th run has nothing left to do
    lines = []
    tune(cfg, parse_space(SPACE, cfg), trials=3, out_dir=out, echo=lines.append)
    assert len(_states(out)[1]) == 5 and any("already has 3 completed or pruned" in line for line in lines)


def test_resuming_with_another_space_or_config_is_refused(tiny_weights, data_root, tmp_path):
    cfg = _cfg(tiny_weights, data_root, **{"train.epochs": 1})
    out = tmp_path / "tune"
    tune(cfg, parse_space(SPACE, cfg), trials=1, out_dir=out, echo=_quiet)
    with pytest.raises(TuneError, match="another search space"):
        tune(cfg, parse_space({"optim.lr": {"low": 1e-3, "high": 1e-2}}, cfg), trials=2, out_dir=out, echo=_quiet)
    other = _cfg(tiny_weights, data_root, **{"train.epochs": 1, "optim.lr_proxy": 0.5})
    with pytest.raises(TuneError, match="another config .*optim.lr_proxy"):
        tune(other, parse_space(SPACE, cfg), trials=2, out_dir=out, echo=_quiet)
    with tune_mod._exclusive(out), pytest.raises(TuneError, match="another promptdml tune is running"):
        tune(cfg, parse_space(SPACE, cfg), trials=2, out_dir=out, echo=_quiet)


def test_cli_tune_end_to_end(tiny_weights, data_root, tmp_path, capsys):
    base = tmp_path / "base.yaml"
    save_config(_cfg(tiny_weights, data_root, **{"data.val_ratio": 0.25}), base)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    out = tmp_path / "o"
    assert main(["tune", "--config", str(base), "--space", str(space), "--trials", "2", "--out", str(out),
                 "--epochs", "1", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "val map@r" in text and "best: trial" in text and "promptdml train --config" in text
    assert "data.val_ratio is 0" not in text  # the config's own validation split is used
    best = load_config(out / "best.yaml")
    assert best.data.val_ratio == 0.25 and best.train.epochs == 1


HOLD_LOCK = """
import fcntl, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f.fileno(), fcntl.LOCK_EX)
if sys.argv[2] == "own":
    f.seek(0); f.truncate(); f.write(str(__import__("os").getpid())); f.flush()
print("held", flush=True)
time.sleep(float(sys.argv[3]))
"""


def _hold(lock, mode, seconds):
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock), mode, str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_left_by_the_workers_of_a_killed_tune_is_waited_for(tmp_path, monkeypatch):
    """After `kill -9` of a tune, its forked data-loader workers hold the lock a few seconds more: a rerun
    waits for them instead of refusing; a live tune is refused at once."""
    out = tmp_path / "tune"
    out.mkdir()
    lock = out / ".tune.lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(str(dead.pid))  # the killed tune's PID; an orphan (this holder) keeps the flock
    holder = _hold(lock, "keep", 1.5)
    with tune_mod._exclusive(out):
        assert holder.wait(timeout=10) == 0  # the lock came free when the orphan exited, not before
        assert lock.read_text() == str(os.getpid())
    live = _hold(lock, "own", 30)  # a running tune (its PID is alive)
    try:
        with pytest.raises(TuneError, match="another promptdml tune is running"), tune_mod._exclusive(out):
            pass
    finally:
        live.kill()
        live.wait()
    lock.write_text(str(dead.pid))
    monkeypatch.setattr(tune_mod, "ORPHAN_WAIT_S", 0.5)
    stuck = _hold(lock, "keep", 30)  # orphans that never exit: refused after the wait, with the reason
    try:
        with pytest.raises(TuneError, match="has exited, but processes it started still hold"), \
                tune_mod._exclusive(out):
            pass
    finally:
        stuck.kill()
        stuck.wait()
