"""Training-step speed of VPTSP-G against the floor of two prompted forward+backward passes.

    python benchmarks/train_speed.py                 # cub200_small settings: ViT-S/16, 224 px, batch 16, CPU
    python benchmarks/train_speed.py --steps 3 --img-size 112

The method needs two passes of the frozen prompted ViT per step (shared prompts for the embedding, class
prompts for the proxies). The floor is exactly those two forward+backward passes over the same batch, with
nothing else (no heads, GRU, loss or optimiser). ``Trainer.train_step`` is the full step. Both are timed
interleaved in one process (so machine load affects them alike); peak memory of each is measured in its
own subprocess. Weights are random (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report import update_section  # noqa: E402


def build(args: argparse.Namespace):
    from PIL import Image

    from promptdml.cli import resolve_config_path
    from promptdml.config import load_config
    from promptdml.engine import Trainer

    root = Path(tempfile.mkdtemp()) / "classes"
    for c in range(2 * args.classes):  # a folder dataset only to construct the Trainer; batches are synthetic
        (root / f"c{c:04d}").mkdir(parents=True)
        for j in range(2):
            Image.new("RGB", (8, 8), (c % 255, j, 0)).save(root / f"c{c:04d}" / f"{j}.png")
    cfg = load_config(resolve_config_path(args.config), {
        "data.dataset": "folder", "data.root": str(root), "data.batch_size": args.batch_size,
        "data.num_workers": 0, "model.backbone.pretrained": False, "model.backbone.img_size": args.img_size,
        "train.output_dir": tempfile.mkdtemp(), "train.progress": False, "train.tensorboard": False,
        "train.device": args.device, "train.precision": args.precision})
    trainer = Trainer(cfg, echo=lambda s: None)
    k = cfg.data.samples_per_class
    labels = torch.arange(args.batch_size // k).repeat_interleave(k)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=trainer.device)
    labels = labels.to(trainer.device)
    return trainer, images, labels


def floor_step(trainer, images, labels) -> None:
    """Two forward+backward passes of the prompted frozen ViT: shared prompts, then class prompts."""
    from promptdml.engine.device import autocast

    model = trainer.model
    for prompts in (model.shared_prompts(), model.class_prompts(labels)):
        with autocast(trainer.device, trainer.dtype):
            out = model.backbone(images, prompts)
        out.float().sum().backward()
    model.zero_grad(set_to_none=True)


def timed(fn, *a) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    fn(*a)
    sync()
    return time.perf_counter() - t


def run_peak(args: argparse.Namespace, mode: str) -> float:
    cmd = [sys.executable, __file__, "--peak-of", mode, "--config", args.config, "--batch-size",
           str(args.batch_size), "--img-size", str(args.img_size), "--precision", args.precision,
           "--classes", str(args.classes), "--device", args.device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="cub200_small")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--device", default="cpu", help="cpu, cuda, mps (GPU checks: benchmarks/gpu_check.sh)")
    ap.add_argument("--section", default="train_speed", help="BENCHMARKS.md section to write")
    ap.add_argument("--classes", type=int, default=100, help="training classes (class-prompt table rows)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peak-of", choices=["floor", "method"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    trainer, images, labels = build(args)
    if args.peak_of:
        import resource

        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(2):
            floor_step(trainer, images, labels) if args.peak_of == "floor" else trainer.train_step(images, labels)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if trainer.device.type == "cuda":  # device memory is what matters on a GPU
            peak = torch.cuda.max_memory_allocated(trainer.device) / 2**20
        print(json.dumps({"peak_mib": peak, "before_mib": base / 1024}))
        return 0
    for _ in range(args.warmup):
        floor_step(trainer, images, labels)
        trainer.train_step(images, labels)
    floors, steps = [], []
    for _ in range(args.steps):
        floors.append(timed(floor_step, trainer, images, labels))
        steps.append(timed(trainer.train_step, images, labels))
    f, s = statistics.median(floors), statistics.median(steps)
    ratio = s / f
    peak_floor, peak_method = run_peak(args, "floor"), run_peak(args, "method")
    print(f"floor (2 prompted fwd+bwd): {f:.3f} s/step   VPTSP-G train_step: {s:.3f} s/step   ratio {ratio:.3f}")
    print(f"peak memory: floor {peak_floor:.0f} MiB, method {peak_method:.0f} MiB; "
          f"{args.batch_size / s:.1f} images/s")
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    md = (
        "## Training speed (`benchmarks/train_speed.py`)\n\n"
        f"`{args.config}` settings (ViT-S/16 shape, random weights), {args.img_size} px, batch {args.batch_size}, "
        f"{args.precision} autocast on {args.device} ({torch.get_num_threads()} CPU threads, load average {load} "
        "at the end), "
        f"{args.classes} training classes; median of {args.steps} interleaved steps after {args.warmup} warm-up "
        "steps. Floor = two forward+backward passes of the frozen prompted ViT over the batch (shared prompts, "
        "class prompts), which the method cannot avoid.\n\n"
        "| | s/step | peak memory (MiB; RSS on CPU, allocated on CUDA) |\n|---|---:|---:|\n"
        f"| floor: 2 prompted fwd+bwd | {f:.3f} | {peak_floor:.0f} |\n"
        f"| VPTSP-G `Trainer.train_step` | {s:.3f} | {peak_method:.0f} |\n\n"
        f"**Ratio step / floor: {ratio:.3f}** (target <= 1.15).\n")
    update_section(args.section, md.replace("## Training speed", f"## Training speed ({args.device})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
