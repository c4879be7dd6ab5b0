"""Class-prompt sources (``model.class_prompts.source``: table, lowrank, generated) at SOP size: the cost side.

sop_small settings (11,318 classes; class prompts 5/12/0 -> 60 tokens of 384 dims per class; AdamW), a
randomly initialised ViT-S/16 (12 blocks) at a small image size, random images, the real
``Trainer.train_step``. ``table`` runs with the memory bank on (how it runs at this size), the other sources
without (they have no rows to bank). Per source, each in its own process:

* trainable parameters, of which class-prompt parameters (the source's groups in ``promptdml info``);
* s / step (mean of the steps after the first) and the peak RSS of the process (``ru_maxrss``);
* the bytes of the trainable-only checkpoint (``model.trainable_state()`` written with safetensors, buffers
  such as the generated source's descriptors included);
* bytes received per step and rank in a 2-process gloo run (``benchmarks/ddp_bytes.py --source``): the
  class-prompt row exchange (table) or nothing (the shared parts of lowrank / generated are dense
  parameters, all-reduced with the rest).

Accuracy is measured on real data by ``benchmarks/real_data.py`` (``--set model.class_prompts.source=...``).
Result: BENCHMARKS.md, section ``class_prompts``.

    python benchmarks/class_prompts.py                  # all sources at SOP size, writes BENCHMARKS.md
    python benchmarks/class_prompts.py --smoke          # tiny 2-block ViT, 40 classes, 2 steps: seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "src" / "promptdml" / "configs" / "sop_small.yaml"
SOURCES = ("table", "lowrank", "generated")
SOP_CLASSES = 11_318
SMOKE = {"model.backbone.name": "vit_tiny_patch16_224", "model.backbone.depth": 2, "model.embed_dim": 16,
         "model.prompts.num_prompt": 2, "model.prompts.prompt_depth": 2, "model.prompts.num_p_prompt": 2,
         "model.prompts.p_prompt_depth": 2, "model.class_prompts.hidden": 16, "model.class_prompts.rank": 4}
CLASS_GROUPS = ("class_prompts", "class_codes", "prompt_bases", "prompt_generator")


def worker(source: str, args: argparse.Namespace) -> dict:
    import torch
    from safetensors.torch import save_file

    from promptdml.config import load_config
    from promptdml.engine.device import resolve_device
    from promptdml.engine.factory import TrainParts
    from promptdml.engine.optim import build_optimizers
    from promptdml.engine.trainer import Trainer
    from promptdml.losses import build_loss
    from promptdml.models import create_model
    from promptdml.models.model import count_parameters

    torch.manual_seed(0)
    overrides = {"model.backbone.pretrained": False, "model.backbone.img_size": args.img_size,
                 "model.class_prompts.source": source, "model.class_prompts.rank": args.rank,
                 "model.class_prompts.hidden": args.hidden,
                 "model.memory_bank": "on" if source == "table" else "off",
                 "data.batch_size": args.batch_size, "data.samples_per_class": 1, "train.precision": "fp32",
                 "train.device": args.device, "train.progress": False, **(SMOKE if args.smoke else {})}
    cfg = load_config(CONFIG, overrides)
    device = resolve_device(cfg.train.device)
    model = create_model(cfg.model, args.classes).to(device).train()
    trainer = Trainer(cfg, parts=TrainParts(cfg=cfg, model=model, loss_fn=build_loss(cfg.loss),
                                            optimizers=build_optimizers(model, cfg), device=device))
    g = torch.Generator().manual_seed(1)
    times = []
    for _ in range(args.steps):
        labels = torch.randperm(args.classes, generator=g)[:args.batch_size]  # k = 1
        images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g)
        t0 = time.perf_counter()
        trainer.train_step(images, labels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    counts = count_parameters(model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.trainable_state().items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_file(state, str(path))
        ckpt_bytes = path.stat().st_size
    cp_ckpt = sum(v.numel() * v.element_size() for k, v in state.items() if k.startswith("class_prompts"))
    return {"source": source, "classes": args.classes, "describe": model.class_prompts.describe(),
            "class_prompt_params": sum(counts.get(g, 0) for g in CLASS_GROUPS), "trainable": counts["trainable"],
            "checkpoint_bytes": ckpt_bytes, "class_prompt_checkpoint_bytes": cp_ckpt,
            "sec_per_step": sum(times[1:]) / max(len(times) - 1, 1), "first_step_s": times[0],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "memory_bank": bool(model.memory_bank), "device": str(device), "torch": torch.__version__}


def ddp_received_per_step(source: str, args: argparse.Namespace) -> dict[str, float]:
    """Bytes received per step and rank, per traffic tag, from a 2-process ``ddp_bytes`` run."""
    sys.path.insert(0, str(HERE))
    import ddp_bytes

    ns = argparse.Namespace(source=source, cp_rank=args.rank, cp_hidden=args.hidden, ranks=2,
                            classes=args.classes, img_size=args.img_size,
                            batch_size=args.batch_size, steps=args.ddp_steps,
                            out=str(Path(tempfile.gettempdir()) / f"promptdml_cp_ddp_{source}"))
    r = ddp_bytes.launch(ns)
    out: dict[str, float] = {}
    for tag, v in r["traffic"].items():
        key = tag.split("/")[0]
        out[key] = out.get(key, 0.0) + v["received"] / r["steps"]
    return out


def to_markdown(rows: list[dict], args: argparse.Namespace) -> str:
    by = {r["source"]: r for r in rows}
    t = by.get("table")
    lines = [
        "## Class-prompt sources at SOP size (`benchmarks/class_prompts.py`)",
        "",
        f"sop_small settings at {args.classes:,} classes (class prompts 5/12/0), AdamW, randomly initialised "
        f"ViT-S/16 (12 blocks) at {args.img_size} px, batch {args.batch_size} random images (k = 1), fp32, "
        f"{args.steps} steps of `Trainer.train_step` per source, each in its own process (`table` with the memory "
        f"bank on); DDP bytes from 2 gloo processes ({args.ddp_steps} steps). lowrank rank {args.rank}, generated "
        f"hidden {args.hidden}. Device {rows[0]['device']}, torch {rows[0]['torch']}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores.",
        "",
        "| source | class-prompt params | trainable params | s / step | peak RSS (MiB) | checkpoint (MB) "
        "| DDP: class-prompt bytes / step | DDP: dense-gradient bytes / step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        d = r.get("ddp", {})
        lines.append(
            f"| {r['source']} ({r['describe']}) | {r['class_prompt_params']:,} | {r['trainable']:,} | "
            f"{r['sec_per_step']:.2f} | {r['peak_rss_mb']:.0f} | {r['checkpoint_bytes'] / 1e6:,.1f} | "
            f"{d.get('class_prompts', 0):,.0f} | {d.get('dense_grads', 0):,.0f} |")
    if t is not None:
        lines.append("")
        for r in rows:
            if r["source"] == "table":
                continue
            lines.append(
                f"- {r['source']}: {r['class_prompt_params'] / max(t['class_prompt_params'], 1):.2%} of the table's "
                f"class-prompt parameters; step {r['sec_per_step'] / t['sec_per_step']:.2f}x table + memory bank "
                f"(no slower: {'yes' if r['sec_per_step'] <= t['sec_per_step'] else 'NO'}); peak RSS "
                f"{r['peak_rss_mb']:.0f} vs {t['peak_rss_mb']:.0f} MiB (lower: "
                f"{'yes' if r['peak_rss_mb'] < t['peak_rss_mb'] else 'NO'}); checkpoint "
                f"{r['checkpoint_bytes'] / t['checkpoint_bytes']:.2%} of the table's (< 5%: "
                f"{'yes' if r['checkpoint_bytes'] < 0.05 * t['checkpoint_bytes'] else 'NO'}).")
    lines += ["", f"Command: `python benchmarks/class_prompts.py --classes {args.classes} --img-size {args.img_size} "
              f"--batch-size {args.batch_size} --steps {args.steps}`"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=SOURCES, help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true", help="tiny backbone, 40 classes, 2 steps per source, no DDP")
    p.add_argument("--classes", type=int, default=SOP_CLASSES)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--ddp-steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--rank", type=int, default=8, help="model.class_prompts.rank of lowrank")
    p.add_argument("--hidden", type=int, default=12, help="model.class_prompts.hidden of generated")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    p.add_argument("--no-report", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.classes, args.steps, args.batch_size, args.img_size = 40, 2, 8, 32
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0
    rows = []
    for source in args.sources:
        cmd = [sys.executable, __file__, "--worker", source, "--classes", str(args.classes), "--steps",
               str(args.steps), "--batch-size", str(args.batch_size), "--img-size", str(args.img_size),
               "--rank", str(args.rank), "--hidden", str(args.hidden), "--device", args.device]
        if args.smoke:
            cmd.append("--smoke")
        print(f"== {source}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise SystemExit(f"worker '{source}' failed with exit code {proc.returncode}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        if not args.smoke:
            row["ddp"] = ddp_received_per_step(source, args)
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    md = to_markdown(rows, args)
    print(md)
    if not args.no_report and not args.smoke:
        sys.path.insert(0, str(HERE))
        from report import update_section

        update_section("class_prompts", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
