"""Hyper-parameter search on the validation split: ``promptdml tune`` (Optuna; docs/tune.md).

A *search space* file names config keys with a range or a list of choices::

    optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
    model.proxy.proxy_bias_ratio: {low: 0.3, high: 0.9}
    optim.head_warmup_epochs: {choices: [0, 1]}

Every trial is an ordinary training run (its own run directory under ``OUT/trials/``) on the training classes
minus a class-disjoint validation split (``data.val_ratio``); the test split is never built
(``build_splits(..., with_test=False)``). Each epoch's validation MAP@R is reported to Optuna, whose median
pruner may stop a trial early (through the trainer's ``on_epoch`` callback). The study lives in
``OUT/study.db`` (SQLite): rerunning the same command continues it; a trial that was running when the process
died is marked failed and the study carries on until ``--trials`` trials have completed or been pruned.

Outputs in ``OUT``: ``best.yaml`` (the resolved config with the best trial's values, trainable with
``promptdml train --config OUT/best.yaml``), ``trials.csv``, ``val_map_r.png``, ``importance.json``.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import difflib
import json
import logging
import math
import os
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from promptdml.config import (
    Config,
    ConfigError,
    _all_keys,
    _coerce,
    _field_types,
    _unknown_key_error,
    set_key,
    to_dict,
)

log = logging.getLogger("promptdml")

SPACE_DIR = Path(__file__).resolve().parent / "configs" / "spaces"
DEFAULT_SPACE = SPACE_DIR / "vptsp_g.yaml"
DEFAULT_VAL_RATIO = 0.2
"""Validation share of the training classes that tune uses when the config has ``data.val_ratio = 0``."""
METRIC = "map@r"
"""The objective: validation MAP@R of a trial's last epoch (maximised)."""
STUDY_FILE = "study.db"
STUDY_NAME = "promptdml-tune"
MAX_FAILURES_IN_A_ROW = 3
PRUNER_STARTUP_TRIALS = 2
"""The median pruner compares a trial with the finished ones once this many have finished..."""
PRUNER_WARMUP_EPOCHS = 1
"""... and never stops a trial during its first this-many epochs."""
INSTALL_HINT = 'promptdml tune needs Optuna: pip install "promptdml[tune]" (or pip install optuna)'

# Keys a search space may not vary, and why.
FIXED_KEYS = {
    "data.val_ratio": "it defines the validation split, and trials are only comparable on one split",
    "data.train_ratio": "it defines which classes are training (and validation) classes",
    "data.dataset": "every trial must use the same data",
    "data.root": "every trial must use the same data",
    "data.demo_classes": "every trial must use the same data",
    "data.demo_images_per_class": "every trial must use the same data",
    "data.demo_image_size": "every trial must use the same data",
    "train.output_dir": "tune writes every trial to OUT/trials/ (choose OUT with --out)",
    "train.run_name": "tune names the trials' run directories itself (trial_0000, ...)",
}
# Keys whose change does not make a study another one (resuming with them changed is fine).
RESUME_FREE_KEYS = {"train.output_dir", "train.run_name", "train.progress", "train.device", "data.num_workers",
                    "model.backbone.weights", "train.tensorboard"}
SPEC_FIELDS = ("low", "high", "log", "step", "choices")


_clock = time.monotonic  # (replaced by a fake clock in the tests)


class TuneError(RuntimeError):
    """The search cannot run or continue; the message says what to do."""


class TuneInterrupted(TuneError):
    """The search was stopped (Ctrl-C / SIGTERM); rerunning the same command continues it."""


# ----------------------------------------------------------------------------------------------- space
@dataclass(frozen=True)
class Param:
    """One searched config key: a float/int range (``low``..``high``, optionally ``log`` or ``step``) or a list
    of ``choices``."""

    key: str
    kind: str
    """float | int | categorical"""
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def suggest(self, trial: Any) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"one of {list(self.choices)}"
        extra = ", log scale" if self.log else (f", step {self.step}" if self.step else "")
        return f"{self.kind} in [{self.low}, {self.high}]{extra}"

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def resolve_space_path(name: str | Path | None) -> Path:
    """A search-space YAML path, the name of a shipped space (``vptsp_g``), or None for the default."""
    if name is None or str(name) == "":
        return DEFAULT_SPACE
    path = Path(name)
    if path.is_file():
        return path
    shipped = SPACE_DIR / (path.name if path.suffix in (".yaml", ".yml") else path.name + ".yaml")
    if shipped.is_file() and len(path.parts) == 1:
        return shipped
    names = ", ".join(sorted(p.stem for p in SPACE_DIR.glob("*.yaml")))
    raise ConfigError(f"search space '{name}' is neither a file nor a shipped space (shipped: {names}). A space "
                      f"file maps config keys to ranges, e.g. 'optim.lr: {{low: 1.0e-4, high: 1.0e-2, log: true}}' "
                      f"(docs/tune.md).")


def _leaf_types() -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            tp = _field_types(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
            else:
                out[f"{prefix}{f.name}"] = tp

    walk(Config, "")
    return out


def parse_space(data: Any, base: Config, where: str = "the search space") -> list[Param]:
    """Validate a search space (``{dotted key: {low, high[, log | step]} | {choices: [...]}}``) against the config
    tree and the base config; raise ConfigError saying what to fix."""
    example = "e.g. 'optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true}' or 'optim.head_warmup_epochs: {choices: [0, 1]}'"
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{where} must map config keys to a range or choices, {example}")
    types = _leaf_types()
    valid = _all_keys(Config)
    sections = {k.rsplit(".", 1)[0] for k in valid if "." in k} | {k.split(".", 1)[0] for k in valid}
    params: list[Param] = []
    for raw_key, spec in data.items():
        key = str(raw_key)
        if key in sections and key not in types:
            raise ConfigError(f"{where}: '{key}' is a config section; name each searched key in dotted form, {example}")
        if key not in types:
            raise _unknown_key_error(key, valid, where)
        if key in FIXED_KEYS:
            raise ConfigError(f"{where}: {key} cannot be searched: {FIXED_KEYS[key]}. Set it in the config or with "
                              f"--set instead.")
        tp = types[key]
        if isinstance(spec, list):
            raise ConfigError(f"{where}: {key}: write a list of values as {{choices: {spec}}}")
        if not isinstance(spec, dict) or not spec:
            raise ConfigError(f"{where}: {key}: expected {{low: ..., high: ...}} or {{choices: [...]}}, got {spec!r}")
        unknown = [str(f) for f in spec if f not in SPEC_FIELDS]
        if unknown:
            close = difflib.get_close_matches(unknown[0], SPEC_FIELDS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}: {key}: unknown field '{unknown[0]}'.{hint} A key takes low, high and "
                              f"optionally log or step, or choices.")
        if typing.get_origin(tp) is list:
            raise ConfigError(f"{where}: {key} is a list-valued key and cannot be searched")
        if "choices" in spec:
            param = _parse_choices(key, spec, tp, where)
        else:
            param = _parse_range(key, spec, tp, where)
        _check_values(param, base, where)
        params.append(param)
    return params


def _parse_choices(key: str, spec: dict, tp: Any, where: str) -> Param:
    extra = [f for f in spec if f != "choices"]
    if extra:
        raise ConfigError(f"{where}: {key}: give either choices or a range (low/high), not both ('{extra[0]}')")
    choices = spec["choices"]
    if not isinstance(choices, list) or not choices:
        raise ConfigError(f"{where}: {key}: choices must be a non-empty list, e.g. {{choices: [0, 1]}}")
    values = tuple(_coerce(v, tp, f"{where}: {key}") for v in choices)
    if len(set(values)) != len(values):
        raise ConfigError(f"{where}: {key}: choices {list(choices)} repeat a value")
    return Param(key, "categorical", choices=values)


def _parse_range(key: str, spec: dict, tp: Any, where: str) -> Param:
    if tp not in (int, float):
        name = "str" if typing.get_origin(tp) is typing.Literal else getattr(tp, "__name__", str(tp))
        raise ConfigError(f"{where}: {key} is a {name} key; list its values instead: {{choices: [...]}}")
    missing = [f for f in ("low", "high") if f not in spec]
    if missing:
        raise ConfigError(f"{where}: {key}: a range needs both low and high (missing {', '.join(missing)}), or "
                          f"give {{choices: [...]}}")
    low, high = (_coerce(spec[f], tp, f"{where}: {key}.{f}") for f in ("low", "high"))
    log_scale = _coerce(spec.get("log", False), bool, f"{where}: {key}.log")
    step = _coerce(spec["step"], tp, f"{where}: {key}.step") if spec.get("step") is not None else None
    if not low < high:
        raise ConfigError(f"{where}: {key}: low ({low}) must be smaller than high ({high})")
    if log_scale and low <= 0:
        raise ConfigError(f"{where}: {key}: a log-scale range needs low > 0 (got {low}); use log: false or a "
                          f"positive low")
    if step is not None:
        if log_scale:
            raise ConfigError(f"{where}: {key}: step and log cannot be combined; drop one of them")
        if step <= 0:
            raise ConfigError(f"{where}: {key}: step must be > 0, got {step}")
    return Param(key, "int" if tp is int else "float", low, high, bool(log_scale), step)


def _check_values(param: Param, base: Config, where: str) -> None:
    """Every choice and both ends of a range must give a valid config together with the base config."""
    values = param.choices if param.kind == "categorical" else (param.low, param.high)
    for value in values:
        cfg = copy.deepcopy(base)
        set_key(cfg, param.key, value)
        try:
            cfg.validate()
        except ConfigError as e:
            raise ConfigError(f"{where}: {param.key} = {value} ({param.describe()}) gives an invalid config: {e}. "
                              f"Narrow the range or change the base config.") from None


def load_space(path: str | Path | None, base: Config) -> list[Param]:
    """Read and validate a search-space file (None: the shipped default for VPTSP-G)."""
    path = resolve_space_path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"search space '{path}' is not valid YAML: {e}") from None
    return parse_space(data, base, f"search space {path}")


# ----------------------------------------------------------------------------------------------- study
def _require_optuna():
    try:
        import optuna
    except ImportError:
        raise TuneError(INSTALL_HINT) from None
    return optuna


ORPHAN_WAIT_S = 30.0  # how long a new tune waits for the data-loader workers of a killed one to exit


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


@contextlib.contextmanager
def _exclusive(out_dir: Path):
    """One tune process per output folder (the lock goes away with the process, however it ends).

    The lock is an ``flock`` on ``.tune.lock``, which holds the owner's PID. Forked data-loader workers
    inherit it: after a tune is killed (``kill -9``) they hold it for a few seconds more. A new tune that
    finds the lock held by a process that no longer exists therefore waits for them (up to
    ``ORPHAN_WAIT_S``) instead of refusing."""
    lock = open(out_dir / ".tune.lock", "a+")  # noqa: SIM115 - closed below
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            fcntl = None
        if fcntl is not None:
            deadline = time.monotonic() + ORPHAN_WAIT_S
            while True:
                try:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    lock.seek(0)
                    owner = lock.read().strip()
                    stale = owner.isdigit() and not _pid_alive(int(owner))
                    if not stale or time.monotonic() >= deadline:
                        extra = (f" (its owner, PID {owner}, has exited, but processes it started still hold "
                                 f"the lock: stop them)" if stale else "")
                        raise TuneError(f"another promptdml tune is running on '{out_dir}'{extra}; wait for it "
                                        f"or use another --out") from None
                    time.sleep(0.5)
            lock.seek(0)
            lock.truncate()
            lock.write(str(os.getpid()))
            lock.flush()
        yield
    finally:
        lock.close()


def _study_config(cfg: Config) -> dict[str, Any]:
    flat = _flatten(to_dict(cfg))
    return {k: v for k, v in flat.items() if k not in RESUME_FREE_KEYS}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_same_study(study: Any, cfg: Config, space: list[Param], out_dir: Path) -> None:
    attrs = study.user_attrs
    config, params = _study_config(cfg), [p.as_dict() for p in space]
    if "config" not in attrs:
        study.set_user_attr("config", json.dumps(config, sort_keys=True))
        study.set_user_attr("space", json.dumps(params))
        study.set_user_attr("metric", f"val_{METRIC}")
        return
    old_config, old_space = json.loads(attrs["config"]), json.loads(attrs["space"])
    if old_space != params:
        raise TuneError(f"the study in '{out_dir}' was started with another search space "
                        f"({', '.join(p['key'] for p in old_space)}). Continue it with the same --space, or choose "
                        f"a new --out for a new study.")
    changed = sorted(k for k in set(old_config) | set(config) if old_config.get(k) != config.get(k))
    if changed:
        shown = ", ".join(f"{k}: {old_config.get(k)!r} -> {config.get(k)!r}" for k in changed[:5])
        raise TuneError(f"the study in '{out_dir}' was started with another config ({shown}). Continue it with the "
                        f"same config and --set options, or choose a new --out for a new study.")


def _fail_stale_trials(study: Any, optuna: Any, echo: Callable[[str], None]) -> None:
    """Trials left RUNNING by a process that died (killed mid-trial) are marked FAIL; their params stay listed."""
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        echo(f"trial {t.number} was interrupted by the end of an earlier run: marked failed (its run directory "
             f"is kept); the study continues")


# ----------------------------------------------------------------------------------------------- results
@dataclass
class TuneResult:
    out_dir: Path
    study_path: Path
    best_trial: int | None
    best_value: float | None
    best_params: dict[str, Any]
    best_config: Path | None
    trials_csv: Path
    plot: Path | None
    importance: dict[str, float] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)


def _trial_rows(study: Any, space: list[Param]) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        value = t.value if t.value is not None else t.user_attrs.get("last_val")
        row = {"number": t.number, "state": t.state.name, f"val_{METRIC}": value,
               "epochs_run": t.user_attrs.get("epochs_run", ""), "seconds": t.user_attrs.get("seconds", "")}
        for p in space:
            row[p.key] = t.params.get(p.key, "")
        row["run_dir"] = t.user_attrs.get("run_dir", "")
        row["note"] = t.user_attrs.get("error", "interrupted" if t.state.name == "FAIL" else "")
        rows.append(row)
    return rows


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    keys = list(rows[0]) if rows else ["number", "state", f"val_{METRIC}", "epochs_run", "seconds"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in r.items()})


def _plot(rows: list[dict[str, Any]], path: Path, echo: Callable[[str], None]) -> Path | None:
    """Validation MAP@R per trial (completed and pruned; pruned = last reported epoch) and the running best."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        echo(f"no plot: matplotlib is not installed (pip install matplotlib); the values are in {path.parent}/"
             f"trials.csv")
        return None
    key = f"val_{METRIC}"
    fig, ax = plt.subplots(figsize=(7, 4))
    for state, style in (("COMPLETE", dict(color="tab:blue", marker="o")),
                         ("PRUNED", dict(color="tab:orange", marker="x"))):
        pts = [(r["number"], r[key]) for r in rows if r["state"] == state and isinstance(r[key], (int, float))]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=state.lower(), **style)
    done = [(r["number"], r[key]) for r in rows if r["state"] == "COMPLETE" and isinstance(r[key], (int, float))]
    if done:
        best, xs, ys = -math.inf, [], []
        for n, v in done:
            best = max(best, v)
            xs.append(n)
            ys.append(best)
        ax.step(xs, ys, where="post", color="tab:green", label="best so far")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation {METRIC.upper()}")
    ax.set_title("promptdml tune: validation MAP@R per trial")
    if done or any(r["state"] == "PRUNED" for r in rows):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _importance(study: Any, optuna: Any, space: list[Param]) -> tuple[dict[str, float], str]:
    complete = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    if len(complete) < 2:
        return {}, f"importance needs at least 2 completed trials (have {len(complete)})"
    varied = [p.key for p in space if len({repr(t.params.get(p.key)) for t in complete}) > 1]
    if not varied:
        return {}, "importance: no key took more than one value among the completed trials"
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        values = optuna.importance.get_param_importances(study, evaluator=evaluator, params=varied)
    except (ValueError, RuntimeError) as e:
        return {}, f"importance could not be computed: {e}"
    note = "" if len(complete) >= 10 else f" (from {len(complete)} completed trials: a rough indication only)"
    return {k: float(v) for k, v in values.items()}, "importance of each key (fANOVA)" + note


def _write_best_config(base: Config, params: dict[str, Any], path: Path, header: str) -> None:
    cfg = copy.deepcopy(base)
    for key, value in params.items():
        set_key(cfg, key, value)
    cfg.validate()
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    path.write_text("".join(f"# {line}\n" for line in header.splitlines()) + text)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def format_table(rows: list[dict[str, Any]], space: list[Param]) -> str:
    cols = ["number", "state", f"val_{METRIC}", "epochs_run", "seconds"] + [p.key for p in space]
    heads = ["trial", "state", f"val {METRIC}", "epochs", "seconds"] + [p.key for p in space]
    table = [[_fmt(r.get(c)) if c != "seconds" or r.get(c) in ("", None) else f"{r[c]:.0f}" for c in cols]
             for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(heads)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(heads, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(t, widths, strict=True)) for t in table]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- search
def default_out_dir(cfg: Config) -> Path:
    return Path(cfg.train.output_dir) / f"tune-{cfg.train.run_name or cfg.data.dataset}"


def tune(cfg: Config, space: str | Path | Sequence[Param] | None = None, trials: int = 20,
         out_dir: str | Path | None = None, timeout: float | None = None, echo: Callable[[str], None] = print,
         pruner: Any = None, sampler: Any = None) -> TuneResult:
    """Search ``space`` (a file, a shipped name, parsed :class:`Param` s or None for the default) on the
    validation split of ``cfg`` until ``trials`` trials have completed or been pruned (counting those of an
    earlier run of the same study in ``out_dir``), or ``timeout`` seconds have passed (no new trial starts
    after it; the running one finishes).

    ``pruner`` / ``sampler`` replace the median pruner and the seeded TPE sampler (tests)."""
    optuna = _require_optuna()
    from promptdml.data import build_splits
    from promptdml.engine.trainer import TrainingError, TrainingInterrupted

    if trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {trials}")
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"--timeout must be > 0 seconds, got {timeout}")
    base = copy.deepcopy(cfg)
    if base.data.val_ratio <= 0:
        base.data.val_ratio = DEFAULT_VAL_RATIO
        echo(f"data.val_ratio is 0 in the config: tuning holds out {DEFAULT_VAL_RATIO:.0%} of the training classes "
             f"as the validation split (set --set data.val_ratio=... to choose); best.yaml keeps this setting")
    base.validate()
    params = list(space) if isinstance(space, (list, tuple)) else load_space(space, base)
    out = Path(out_dir) if out_dir else default_out_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_path = out / STUDY_FILE
    storage = f"sqlite:///{study_path.absolute()}"

    with _exclusive(out):
        # the data keys cannot be searched (FIXED_KEYS): one split for every trial, built before the study so that
        # a data problem stops here; the training and validation classes only, the test split is never built
        splits = build_splits(base.data, with_test=False)
        echo(f"data: {splits.train.num_classes} training classes ({len(splits.train)} images), validation split "
             f"{splits.val.num_classes} classes ({len(splits.val)} images); the test split is not built")
        study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction="maximize",
                                    load_if_exists=True)
        _check_same_study(study, base, params, out)
        _fail_stale_trials(study, optuna, echo)
        previous = len(study.trials)
        # seeded; offset by the trials already run, so a resumed study does not redraw the first trials' values
        study.sampler = sampler or optuna.samplers.TPESampler(seed=base.train.seed + previous)
        # steps are epochs (1, 2, ...); the pruner may stop a trial at a step >= n_warmup_steps
        study.pruner = pruner or optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS,
                                                             n_warmup_steps=PRUNER_WARMUP_EPOCHS + 1)
        finished_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

        def finished() -> int:
            return len(study.get_trials(deepcopy=False, states=finished_states))

        done = finished()
        echo(f"promptdml tune: {len(params)} keys, {trials} trials, study {study_path}"
             + (f" (continuing: {previous} trials so far, {done} completed or pruned)" if previous else ""))
        for p in params:
            echo(f"  {p.key}: {p.describe()}")
        if done >= trials:
            echo(f"the study already has {done} completed or pruned trials (>= --trials {trials}); raise --trials "
                 f"to run more")
        deadline = _clock() + timeout if timeout else None
        failures = 0
        interrupted: int | None = None
        while finished() < trials:
            if deadline is not None and _clock() >= deadline:
                echo(f"--timeout {timeout:g} s reached: no new trial is started")
                break
            trial = study.ask()
            t0 = _clock()
            epochs_run = [0]
            try:
                value = _run_trial(trial, params, base, out, splits, epochs_run, echo, optuna)
                _attrs(trial, epochs_run[0], t0)
                study.tell(trial, value)
                failures = 0
                echo(f"trial {trial.number}: val {METRIC} {value:.4f} ({epochs_run[0]} epochs, "
                     f"{_clock() - t0:.0f} s)")
            except optuna.TrialPruned as e:
                _attrs(trial, epochs_run[0], t0)
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                failures = 0
                echo(f"trial {trial.number}: pruned at {e}")
            except (TrainingInterrupted, KeyboardInterrupt):  # Ctrl-C / SIGTERM: stop the search, resumable
                _attrs(trial, epochs_run[0], t0, "interrupted")
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                interrupted = trial.number
                break
            except (TrainingError, ConfigError) as e:  # this trial's values do not train: record, carry on
                _attrs(trial, epochs_run[0], t0, str(e).splitlines()[0][:300])
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                failures += 1
                echo(f"trial {trial.number}: failed: {e}")
                if failures >= MAX_FAILURES_IN_A_ROW:
                    _report(study, optuna, params, base, out, echo, trials)
                    raise TuneError(f"{failures} trials in a row failed (last: {e}). Narrow the search space "
                                    f"(e.g. lower optim.lr's high end) and rerun; the study is kept.") from None
            except BaseException as e:  # unexpected: record the trial and the reports, then stop
                _attrs(trial, epochs_run[0], t0, f"crashed: {type(e).__name__}: {e}"[:300])
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                with contextlib.suppress(Exception):
                    _report(study, optuna, params, base, out, echo, trials)
                raise
        result = _report(study, optuna, params, base, out, echo, trials)
    if interrupted is not None:
        raise TuneInterrupted(f"interrupted during trial {interrupted}; the study is saved in "
                              f"{study_path}. Rerun the same command to continue it.") from None
    return result


def _run_trial(trial: Any, params: list[Param], base: Config, out: Path, splits: Any, epochs_run: list[int],
               echo: Callable[[str], None], optuna: Any) -> float:
    """Train one trial's config on the training classes, validate every epoch; the last epoch's val MAP@R."""
    from promptdml.engine.trainer import Trainer

    values = {p.key: p.suggest(trial) for p in params}
    cfg = copy.deepcopy(base)
    for key, value in values.items():
        set_key(cfg, key, value)
    cfg.train.output_dir = str(out / "trials")
    cfg.train.run_name = f"trial_{trial.number:04d}"
    cfg.validate()
    trial.set_user_attr("run_dir", str(Path(cfg.train.output_dir) / cfg.train.run_name))
    echo(f"trial {trial.number}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()))

    def trainer_echo(line: str) -> None:
        if line.startswith("epoch"):  # the per-epoch lines, not the parameter report of every trial
            echo(f"  trial {trial.number}: {line}")

    def on_epoch(row: dict[str, float]) -> None:
        epochs_run[0] = int(row["epoch"])
        value = row.get(f"val_{METRIC}")
        if value is None:  # not evaluated this epoch (eval.every)
            return
        trial.set_user_attr("last_val", float(value))
        trial.report(float(value), int(row["epoch"]))
        if trial.should_prune():
            raise optuna.TrialPruned(f"epoch {int(row['epoch'])}: val {METRIC} {value:.4f}")

    trainer = Trainer(cfg, splits=splits, echo=trainer_echo)
    try:
        result = trainer.fit(evaluate_before=False, on_epoch=on_epoch)
    finally:
        trainer.close()
    return float(result.history[-1][f"val_{METRIC}"])


def _attrs(trial: Any, epochs_run: int, t0: float, error: str = "") -> None:
    trial.set_user_attr("epochs_run", epochs_run)
    trial.set_user_attr("seconds", round(_clock() - t0, 2))
    if error:
        trial.set_user_attr("error", error)


def _report(study: Any, optuna: Any, params: list[Param], base: Config, out: Path, echo: Callable[[str], None],
            trials: int) -> TuneResult:
    rows = _trial_rows(study, params)
    csv_path = out / "trials.csv"
    _write_csv(rows, csv_path)
    plot = _plot(rows, out / "val_map_r.png", echo)
    importance, note = _importance(study, optuna, params)
    (out / "importance.json").write_text(json.dumps({"importance": importance, "note": note}, indent=2))
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    echo("")
    echo(format_table(rows, params))
    best_cfg = None
    best_trial = best_value = None
    best_params: dict[str, Any] = {}
    if complete:
        best = study.best_trial
        best_trial, best_value, best_params = best.number, float(best.value), dict(best.params)
        best_cfg = out / "best.yaml"
        header = (f"promptdml tune: best of {len(complete)} completed trials (study {out / STUDY_FILE}):\n"
                  f"trial {best.number}, validation {METRIC} {best.value:.4f} (data.val_ratio "
                  f"{base.data.val_ratio:g}); searched: " + ", ".join(f"{k}={_fmt(v)}" for k, v in best_params.items())
                  + f"\ntrain it: promptdml train --config {best_cfg}")
        _write_best_config(base, best_params, best_cfg, header)
        echo(f"\nbest: trial {best.number}, val {METRIC} {best.value:.4f}: "
             + ", ".join(f"{k}={_fmt(v)}" for k, v in best_params.items()))
    else:
        echo("\nno trial has completed yet: no best config")
    if importance:
        echo(note + ": " + ", ".join(f"{k} {v:.2f}" for k, v in importance.items()))
    else:
        echo(note)
    echo(f"written: {csv_path}" + (f", {plot}" if plot else "") + f", {out / 'importance.json'}"
         + (f", {best_cfg}" if best_cfg else ""))
    if best_cfg:
        echo(f"train the best config: promptdml train --config {best_cfg}")
    return TuneResult(out, out / STUDY_FILE, best_trial, best_value, best_params, best_cfg, csv_path, plot,
                      importance, rows)


__all__ = ["DEFAULT_SPACE", "DEFAULT_VAL_RATIO", "Param", "TuneError", "TuneInterrupted", "TuneResult",
           "load_space", "parse_space", "resolve_space_path", "tune"]
