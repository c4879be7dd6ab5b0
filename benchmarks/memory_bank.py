"""Memory of training with the class-prompt memory bank on vs off, at SOP scale (11,318 classes).

sop_small prompt settings (shared 90/12/0, class 5/12/0, AdamW), a randomly initialised ViT-S/16
(``pretrained=false``, all 12 blocks) at a small image size, batch 8 of random images (k = 1). Each mode runs
5 training steps through ``Trainer.train_step`` in its own subprocess; the peak resident set size of that
process (``ru_maxrss``) is recorded, plus the bytes of class-prompt storage that would sit on the compute
device. Result: BENCHMARKS.md, section ``memory_bank``.

    python benchmarks/memory_bank.py            # both modes, writes BENCHMARKS.md
    python benchmarks/memory_bank.py --worker on   # one mode, prints JSON (used internally)
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "src" / "promptdml" / "configs" / "sop_small.yaml"
NUM_CLASSES = 11_318


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(mode: str, args: argparse.Namespace) -> dict:
    import torch

    from promptdml.config import load_config
    from promptdml.engine.device import resolve_device
    from promptdml.engine.factory import TrainParts
    from promptdml.engine.optim import build_optimizers
    from promptdml.engine.trainer import Trainer
    from promptdml.losses import build_loss
    from promptdml.models import create_model

    torch.manual_seed(0)
    cfg = load_config(CONFIG, {
        "model.backbone.pretrained": False, "model.backbone.img_size": args.img_size, "model.memory_bank": mode,
        "data.batch_size": args.batch_size, "data.samples_per_class": 1, "train.precision": "fp32",
        "train.device": args.device})
    device = resolve_device(cfg.train.device)
    rss_start = rss_mb()
    model = create_model(cfg.model, NUM_CLASSES).to(device).train()
    assert model.memory_bank == (mode == "on")
    rss_model = rss_mb()
    # a Trainer around the model without data or run directory: the real train_step
    trainer = Trainer(cfg, parts=TrainParts(cfg=cfg, model=model, loss_fn=build_loss(cfg.loss),
                                            optimizers=build_optimizers(model, cfg), device=device))
    row_state = trainer.optimizers[-1].state[model.class_prompts.placement.holder]
    g = torch.Generator().manual_seed(1)
    times = []
    for _ in range(args.steps):
        labels = torch.randperm(NUM_CLASSES, generator=g)[:args.batch_size]
        images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g)
        t0 = time.time()
        trainer.train_step(images, labels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - t0)
    table = model.class_prompts.table
    table_bytes = table.numel() * table.element_size()
    state_bytes = sum(v.numel() * v.element_size() for v in row_state.values())
    on_device = [t for t in list(model.parameters()) + list(model.buffers())]
    cp_device_bytes = sum(t.numel() * t.element_size() for n, t in list(model.named_parameters())
                          if n.startswith("class_prompts"))
    if mode == "off":  # table, its dense gradient and the row-wise optimiser state all live on the device
        cp_device_bytes += table_bytes + state_bytes  # gradient (same size as the table) + state
    else:  # only the batch's rows (+ their gradient and optimiser-state rows) visit the device per step
        row_bytes = table_bytes // NUM_CLASSES
        cp_device_bytes = args.batch_size * row_bytes * (2 + len(row_state))
    out = {
        "mode": mode, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_start_mb": rss_start, "rss_after_model_mb": rss_model, "rss_end_mb": rss_mb(),
        "sec_per_step": sum(times[1:]) / max(len(times) - 1, 1), "first_step_s": times[0],
        "table_mb": table_bytes / 2**20, "opt_state_mb": state_bytes / 2**20, "table_device": str(table.device),
        "class_prompt_bytes_on_device_mb": cp_device_bytes / 2**20,
        "registered_tensors_mb": sum(t.numel() * t.element_size() for t in on_device) / 2**20,
        "table_shape": list(table.shape), "device": str(device), "torch": torch.__version__,
    }
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def to_markdown(results: list[dict], args: argparse.Namespace) -> str:
    r0 = results[0]
    C, T, D = r0["table_shape"]
    lines = [
        "## Class-prompt memory bank (`benchmarks/memory_bank.py`)",
        "",
        f"SOP scale: {C:,} classes, sop_small prompts (shared 90/12/0, class 5/12/0 -> table [{C}, {T}, {D}] "
        f"= {r0['table_mb']:.0f} MiB fp32), AdamW, randomly initialised ViT-S/16 (12 blocks) at {args.img_size} px, "
        f"batch {args.batch_size} random images (k = 1), fp32, gradient checkpointing as in sop_small, "
        f"{args.steps} training steps through `Trainer.train_step`, each mode in its own process; device "
        f"{r0['device']}, torch {r0['torch']}, {platform.processor() or platform.machine()}.",
        "",
        "| memory bank | peak RSS (MiB) | RSS after model build (MiB) | class-prompt bytes on the compute device "
        "(MiB) | registered params+buffers (MiB) | s / step |" + (" peak CUDA (MiB) |" if "peak_cuda_mb" in r0 else ""),
        "|---|---:|---:|---:|---:|---:|" + ("---:|" if "peak_cuda_mb" in r0 else ""),
    ]
    for r in results:
        lines.append(f"| {r['mode']} | {r['peak_rss_mb']:.0f} | {r['rss_after_model_mb']:.0f} | "
                     f"{r['class_prompt_bytes_on_device_mb']:.1f} | {r['registered_tensors_mb']:.0f} | "
                     f"{r['sec_per_step']:.2f} |" + (f" {r['peak_cuda_mb']:.0f} |" if "peak_cuda_mb" in r else ""))
    by = {r["mode"]: r for r in results}
    if {"on", "off"} <= set(by):
        lines += ["", f"Peak RSS saving with the bank: {by['off']['peak_rss_mb'] - by['on']['peak_rss_mb']:.0f} MiB "
                  "(on a CPU run the table and its optimiser state are host memory either way; the bank avoids "
                  "the dense [C, T, D] gradient of the table). On an accelerator the bank keeps table, gradient "
                  f"and AdamW state ({r0['table_mb'] * 4:.0f} MiB here) off the device; only the batch's rows "
                  "travel. The two modes give the same parameters (tests/test_memory_bank.py)."]
    lines += ["", f"Command: `python benchmarks/memory_bank.py --img-size {args.img_size} --batch-size "
              f"{args.batch_size} --steps {args.steps}`"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=["on", "off"], help=argparse.SUPPRESS)
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0
    results = []
    for mode in ("off", "on"):
        cmd = [sys.executable, __file__, "--worker", mode, "--img-size", str(args.img_size), "--batch-size",
               str(args.batch_size), "--steps", str(args.steps), "--device", args.device]
        print(f"== memory bank {mode}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise SystemExit(f"worker '{mode}' failed with exit code {proc.returncode}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1], indent=1), flush=True)
    md = to_markdown(results, args)
    print(md)
    if not args.no_report:
        sys.path.insert(0, str(HERE))
        from report import update_section

        update_section("memory_bank", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
