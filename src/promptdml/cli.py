"""Command line: ``promptdml train | evaluate | info | demo | data check``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from promptdml import __version__
from promptdml.config import Config, ConfigError, choices_of, load_config, parse_override, resolve_config
from promptdml.registry import DATASETS
from promptdml.text import plural

DOCS = "docs/getting-started.md (all guides in docs/; every config key: docs/configuration.md)"


# --------------------------------------------------------------------------------------------------
# The command line's one set of config flags: each sets one config key; each command takes the ones that act
# for it (COMMAND_FLAGS). The command line always wins over the YAML: defaults, YAML, --set, then flags.
@dataclass(frozen=True)
class Flag:
    option: str
    key: str
    help: str | Callable[[], str]
    """The help text, or a function giving it when the parser is built (lists registered names)."""
    type: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None
    metavar: str | None = None


FLAGS: dict[str, Flag] = {f.option.lstrip("-").replace("-", "_"): f for f in (
    Flag("--dataset", "data.dataset", lambda: "data.dataset: " + ", ".join(DATASETS.names()), metavar="NAME"),
    Flag("--data-root", "data.root", "data.root: your folder of class folders, your CSV list, or the folder "
                                     "holding the benchmark datasets", metavar="PATH"),
    Flag("--weights", "model.backbone.weights", "model.backbone.weights: a local pretrained weights file "
         "(.safetensors/.pth/.bin/.npz) or a folder of them; no network access then (default: $PROMPTDML_WEIGHTS, "
         "the hub cache, then the model hub)", metavar="FILE"),
    Flag("--device", "train.device", "train.device: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps"),
    Flag("--precision", "train.precision", "train.precision: autocast precision (auto = bf16 on CPU, fp16 on "
                                           "CUDA)", choices=choices_of("train.precision")),
    Flag("--epochs", "train.epochs", "train.epochs: number of training epochs", int, metavar="N"),
    Flag("--batch-size", "data.batch_size", "data.batch_size: training images per batch (batch size / "
                                            "data.samples_per_class classes per batch)", int, metavar="N"),
    Flag("--lr", "optim.lr", "optim.lr: learning rate of everything trained except the proxy bias", float),
    Flag("--output-dir", "train.output_dir", "train.output_dir: runs are written to OUTPUT_DIR/NAME",
         metavar="DIR"),
    Flag("--name", "train.run_name", "train.run_name: name of the run directory (default <dataset>-<time>)"),
    Flag("--eval-every", "eval.every", "eval.every: evaluate on the test split every N epochs (default: after "
                                       "training only)", int, metavar="N"),
)}
FLAGS["eval_batch_size"] = Flag("--batch-size", "eval.batch_size", "eval.batch_size: images per forward pass "
                                                                    "when embedding (default: the run's)", int,
                                metavar="N")
FLAG_KEYS = {name: f.key for name, f in FLAGS.items()}
"""Flag attribute -> config key (docs/configuration.md's flag table is generated from FLAGS)."""

_TRAINING = ("dataset", "data_root", "weights", "device", "precision", "epochs", "batch_size", "lr", "output_dir",
             "name", "eval_every")
COMMAND_FLAGS: dict[str, tuple[str, ...]] = {
    "train": _TRAINING,
    "demo": _TRAINING,
    "evaluate": ("dataset", "data_root", "weights", "device", "precision", "eval_batch_size"),
    "info": ("dataset", "data_root"),
    "tune": ("dataset", "data_root", "weights", "device", "precision", "epochs"),
    "data check": ("dataset", "data_root", "batch_size"),
}
"""The config flags each config-building command takes (all of them act for it)."""


def resolve_config_path(name: str | None) -> Path | None:
    """Kept for scripts: :func:`promptdml.config.resolve_config` resolves shipped names."""
    return resolve_config(name)


def add_config_flags(p: argparse.ArgumentParser, command: str, config: str = "optional") -> None:
    """``--config`` (``optional``, ``required`` or ``none``), ``--set`` and the command's flags of FLAGS."""
    if config != "none":
        p.add_argument("--config", "-c", required=config == "required", metavar="YAML_OR_NAME",
                       help="YAML config file or the name of a shipped config (e.g. demo, cub200_small; "
                            "docs/train-benchmark.md lists them)")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optim.lr=0.01 or --set eval.recall_ks=[1,10] "
                        "(repeatable; every key: docs/configuration.md)")
    for name in COMMAND_FLAGS[command]:
        f = FLAGS[name]
        p.add_argument(f.option, dest=name, type=f.type, choices=f.choices, metavar=f.metavar,
                       help=f.help() if callable(f.help) else f.help)


def add_overwrite_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run directory of the same name (default: refuse)")


def add_progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are shown only on a terminal anyway)")


def _flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out = {f.key: getattr(args, name) for name, f in FLAGS.items() if getattr(args, name, None) is not None}
    if getattr(args, "no_progress", False):
        out["train.progress"] = False
    return out


def command_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``--set`` overrides, then the flags (the flags win)."""
    overrides: dict[str, Any] = {}
    for text in args.overrides:
        key, value = parse_override(text)
        overrides[key] = value
    overrides.update(_flag_overrides(args))
    return overrides


USER_DATA_CONFIG = "recommended"
"""The shipped config that ``folder`` and ``csv`` data get when no ``--config`` is named."""


def build_config(args: argparse.Namespace, default_config: str | None = None) -> Config:
    """YAML, then ``--set`` overrides, then explicit flags (the command line wins over the YAML).

    Without ``--config``, your own data (``--dataset folder`` or ``csv``) gets the ``recommended`` config."""
    overrides = command_overrides(args)
    name = getattr(args, "config", None) or default_config
    if name is None and overrides.get("data.dataset") in ("folder", "csv"):
        name = USER_DATA_CONFIG
        print(f"no --config given: using the shipped '{USER_DATA_CONFIG}' config for your own data "
              f"(src/promptdml/configs/{USER_DATA_CONFIG}.yaml)", file=sys.stderr)
    return load_config(name, overrides)


class _OncePerMessage(logging.Filter):
    """Drop records of loggers that print them with their own handler already (huggingface_hub installs a
    stderr handler on its logger), so that each warning appears once."""

    def filter(self, record: logging.LogRecord) -> bool:
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None and logger is not logging.root:
            if logger.handlers:
                return False
            if not logger.propagate:
                break
            logger = logger.parent  # type: ignore[assignment]
        return True


def configure_logging(debug: bool = False) -> None:
    """WARNING (INFO with --debug) on stderr, one copy of each message."""
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING, format="%(levelname)s: %(message)s")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _OncePerMessage) for f in handler.filters):
            handler.addFilter(_OncePerMessage())


# --------------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from promptdml.engine import train
    from promptdml.engine.distributed import env_rank
    from promptdml.engine.trainer import resume

    if env_rank() != 0:  # under torchrun only rank 0 reports; the other ranks log errors only
        logging.getLogger().setLevel(logging.ERROR)
    if args.resume:
        overrides = _resume_overrides(args)
        result = resume(args.resume, overrides=overrides, resume_anyway=args.resume_anyway)
    elif args.check:
        from promptdml.engine.trainer import check

        print(check(build_config(args), overwrite=args.overwrite))
        return 0
    else:
        result = train(build_config(args), overwrite=args.overwrite)
    if env_rank() != 0:
        return 0
    print(f"run directory: {result.run_dir}")
    print(_metrics_table({"test": result.metrics}))
    return 0


def _resume_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The options ``--resume`` accepts (moved files, another device); warns about every other one given."""
    from promptdml.config import parse_override
    from promptdml.engine.trainer import RESUME_KEYS

    given = dict(parse_override(t) for t in args.overrides)
    given.update(_flag_overrides(args))
    keep = {k: v for k, v in given.items() if k in RESUME_KEYS}
    ignored = [k for k in given if k not in RESUME_KEYS]
    if args.config:
        ignored.insert(0, f"--config {args.config}")
    if args.overwrite:
        ignored.append("--overwrite")
    if ignored:
        print(f"warning: --resume continues with the run's own config; ignored: {', '.join(ignored)} (only "
              f"{', '.join(RESUME_KEYS)} may change, e.g. --weights / --data-root for moved files)", file=sys.stderr)
    return keep


def cmd_evaluate(args: argparse.Namespace) -> int:
    from promptdml.engine import evaluate_run
    from promptdml.files import atomic_write_text

    out = Path(args.out) if args.out else (Path(args.run) if Path(args.run).is_dir() else Path(args.run).parent)
    target = out / f"metrics_eval_{args.split}.json" if out.is_dir() else out
    if target.is_dir():
        raise ConfigError(f"--out '{target}' is a folder; pass a file name or an existing folder")
    report: dict[str, Any] = {}
    metrics = evaluate_run(args.run, args.split, command_overrides(args),
                           progress=False if args.no_progress else None, report=report)
    print(_metrics_table({args.split: metrics}))
    payload: dict[str, Any] = dict(metrics)
    if report.get("unreadable"):
        payload["unreadable_eval_images"] = report["unreadable"]
        print(f"warning: {len(report['unreadable'])} unreadable image(s) were left out of the evaluation "
              f"(listed in {target})", file=sys.stderr)
    atomic_write_text(target, json.dumps(payload, indent=2))
    print(f"metrics written to {target}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from promptdml.config import set_key
    from promptdml.models import create_model, format_parameter_report

    cfg = build_config(args)
    set_key(cfg, "model.backbone.pretrained", False)  # counting needs no weights
    num_classes = args.num_classes or _train_class_count(cfg)
    model = create_model(cfg.model, num_classes)
    print(f"backbone: {cfg.model.backbone.name} @ {cfg.model.backbone.img_size}px, "
          f"training classes: {num_classes}")
    print(format_parameter_report(model))
    return 0


def _train_class_count(cfg: Config) -> int:
    d = cfg.data
    n = DATASETS.get(d.dataset).count_train_classes(d)  # validated: a registered dataset
    if n is not None:
        return n - round(d.val_ratio * n)
    from promptdml.data import build_splits

    if not d.root:
        raise ConfigError(f"data.dataset={d.dataset} needs data.root (or pass --num-classes N) to count classes")
    return build_splits(d).train.num_classes


def cmd_demo(args: argparse.Namespace) -> int:
    from promptdml.engine import Trainer

    cfg = build_config(args, default_config="demo")
    print(f"promptdml demo: {cfg.model.backbone.name} @ {cfg.model.backbone.img_size}px on built-in "
          f"procedural data ({cfg.data.demo_classes} classes, first {cfg.data.train_ratio:.0%} train, rest "
          f"test), {plural(cfg.train.epochs, 'epoch')}")
    trainer = Trainer(cfg, overwrite=args.overwrite)
    try:
        result = trainer.fit(evaluate_before=True)
    finally:
        trainer.close()
    print()
    print(_metrics_table({"before (frozen ViT)": result.before or {}, "after (VPTSP-G)": result.metrics}))
    print(f"run directory: {result.run_dir}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """``promptdml tune``: hyper-parameter search on the validation split (promptdml/tune.py, docs/tune.md)."""
    from promptdml.tune import TuneError, TuneInterrupted, tune

    cfg = build_config(args)
    try:
        tune(cfg, args.space, args.trials, args.out, timeout=args.timeout)
    except TuneInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    except TuneError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _add_tune_parser(sub: Any) -> None:
    p = sub.add_parser("tune", help="search hyper-parameters on a validation split (Optuna)",
                       description="Search config keys on a class-disjoint validation split carved from the "
                                   "training classes (data.val_ratio; 0.2 when the config has 0); the test split "
                                   "is never built. Optuna TPE sampler (seeded by train.seed), median pruning on "
                                   "each epoch's validation MAP@R, a SQLite study in OUT (rerun the same command "
                                   "to continue an interrupted search). Writes OUT/best.yaml (train it with "
                                   "promptdml train --config OUT/best.yaml), trials.csv, val_map_r.png and "
                                   "importance.json. Needs: pip install \"promptdml[tune]\". Guide: docs/tune.md")
    add_config_flags(p, "tune")
    p.add_argument("--trials", type=int, default=20,
                   help="completed + pruned trials to reach, counting earlier runs of the study (default 20)")
    p.add_argument("--space", help="search-space YAML (config keys with {low, high[, log|step]} or {choices}); "
                                   "default: the shipped VPTSP-G space (configs/spaces/vptsp_g.yaml)")
    p.add_argument("--timeout", type=float, help="seconds after which no new trial starts")
    p.add_argument("--out", help="study folder (default: OUTPUT_DIR/tune-NAME, e.g. runs/tune-demo)")
    add_progress_flag(p)
    p.set_defaults(func=cmd_tune)


def cmd_data_check(args: argparse.Namespace) -> int:
    from promptdml.data import DataError, inspect_dataset

    cfg = build_config(args, default_config=None)
    report, blocking = inspect_dataset(cfg.data, verify_images=not args.quick, progress=not args.no_progress)
    print(report)
    if blocking:
        raise DataError(f"{plural(len(blocking), 'problem')} above would stop training (listed under 'blocking'); "
                        "fix them, then run promptdml data check again.")
    return 0


def _metrics_table(rows: dict[str, dict[str, float]]) -> str:
    keys: list[str] = []
    for m in rows.values():
        keys += [k for k in m if k not in keys]
    width = max(len(r) for r in rows) + 2
    lines = [" " * width + "".join(f"{k:>13}" for k in keys)]
    for name, m in rows.items():
        lines.append(f"{name:<{width}}" + "".join(f"{m[k]:>13.4f}" if k in m else f"{'-':>13}" for k in keys))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="promptdml",
        description="Parameter-efficient deep metric learning: train visual prompts, biases and a head on a "
                    "frozen timm ViT with semantic proxies (VPTSP-G), and evaluate image retrieval.",
        epilog=f"Docs: {DOCS}")
    parser.add_argument("--version", action="version", version=f"promptdml {__version__}",
                        help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model and evaluate it on the test split",
                       description="Train on a dataset and write a run directory (config, log, plot, "
                                   "checkpoint, metrics). Example: promptdml train --config cub200_small "
                                   "--data-root ~/data. Your own images: docs/train-your-data.md; benchmarks: "
                                   "docs/train-benchmark.md; all keys for --set: docs/configuration.md")
    add_config_flags(p, "train")
    add_progress_flag(p)
    add_overwrite_flag(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last saved state "
                                                       "(its own config is used; only --weights, --data-root and "
                                                       "--device may change, for moved files; other options are "
                                                       "ignored with a warning)")
    p.add_argument("--resume-anyway", action="store_true",
                   help="with --resume: continue even if the data or backbone weights differ from the run's")
    p.add_argument("--check", action="store_true",
                   help="dry run: build the data, the model and one batch of each kind, train nothing, write nothing")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="reload a run and compute retrieval metrics",
                       description="Rebuild a trained model from RUN_DIR on its frozen backbone and evaluate it. "
                                   "The run's own config is used; --set and the flags change it for this "
                                   "evaluation, e.g. --set eval.recall_ks=[1,10] or --data-root elsewhere.")
    p.add_argument("--run", required=True, metavar="RUN_DIR",
                   help="run directory written by `promptdml train` (or its model.safetensors)")
    add_config_flags(p, "evaluate", config="none")
    p.add_argument("--split", default="test", choices=["test", "val"],
                   help="which split to evaluate (default test; val needs data.val_ratio > 0)")
    p.add_argument("--out", metavar="PATH",
                   help="where to write the metrics JSON (default: RUN_DIR/metrics_eval_<split>.json)")
    add_progress_flag(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("info", help="show the model's trainable parameters by group",
                       description="Build the model of a config (no weights needed) and count its trainable "
                                   "parameters per group.")
    add_config_flags(p, "info", config="required")
    p.add_argument("--num-classes", type=int, metavar="N",
                   help="number of training classes (default: from the dataset)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="train on built-in procedural data and show before/after metrics",
                       description="Train VPTSP-G on built-in generated data with a pretrained DINOv2 ViT-S/14 "
                                   "and report Recall@K and MAP@R of the frozen backbone and of the tuned "
                                   "model. Weights: --weights FILE, $PROMPTDML_WEIGHTS, the hub cache, then the "
                                   "model hub (docs/getting-started.md).")
    add_config_flags(p, "demo")
    add_progress_flag(p)
    add_overwrite_flag(p)
    p.set_defaults(func=cmd_demo)

    _add_tune_parser(sub)

    p = sub.add_parser("data", help="dataset tools (data check)", description="Dataset tools.")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="{check}")
    q = data_sub.add_parser("check", help="validate a dataset and print class/image counts per split",
                            description="Validate the layout of a dataset without training: counts per split "
                                        "and every problem; exit status 2 when a problem would stop training.")
    add_config_flags(q, "data check")
    q.add_argument("--quick", action="store_true", help="only check image headers, do not decode every image")
    add_progress_flag(q)
    q.set_defaults(func=cmd_data_check)

    from promptdml.retrieval.commands import register

    register(sub)  # embed, index build, search, export
    return parser


def error_message(e: BaseException) -> tuple[str, int]:
    """The one-line message and exit code for an exception that reached the command line.

    User errors (:class:`~promptdml.errors.PromptDMLError`) and OS errors (a file that cannot be read or
    written) exit with 2; anything else is a bug and exits with 1, asking for ``--debug``.
    """
    from promptdml.errors import PromptDMLError

    if isinstance(e, PromptDMLError):
        return str(e), 2
    if isinstance(e, OSError):
        where = f" '{e.filename}'" if getattr(e, "filename", None) else ""
        reason = e.strerror or str(e) or type(e).__name__
        return f"{reason}{where}", 2
    return (f"unexpected {type(e).__name__}: {e} (this is a bug in promptdml; rerun with --debug for the "
            f"traceback and report it)"), 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.debug)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the command line never shows a traceback without --debug
        if args.debug:
            raise
        message, code = error_message(e)
        print(f"error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
