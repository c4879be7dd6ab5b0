"""Gradient checkpointing of the backbone blocks: same gradients, lower peak memory.

    python benchmarks/grad_checkpointing.py            # ViT-S/16 shape, 224 px, batch 16, fp32, CPU

One VPTSP-G forward+backward (both passes, Proxy Anchor loss) with and without checkpointing. Peak memory
is the process's peak RSS, each setting in its own subprocess; gradients are compared in one process.
Weights are random (memory and gradient equality do not depend on them).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report import update_section  # noqa: E402


def step(ckpt: bool, args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], float]:
    from promptdml.cli import resolve_config_path
    from promptdml.config import load_config
    from promptdml.losses import ProxyAnchorLoss
    from promptdml.models import create_model

    cfg = load_config(resolve_config_path("cub200_small"), {
        "model.backbone.pretrained": False, "model.backbone.img_size": args.img_size,
        "model.backbone.grad_checkpointing": ckpt})
    torch.manual_seed(0)
    model = create_model(cfg.model, 100).train()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g)
    labels = torch.arange(args.batch_size // 2).repeat_interleave(2)
    t = time.perf_counter()
    out = model.forward_train(images, labels, 2)
    ProxyAnchorLoss()(out.embeddings, labels, out.proxy.proxies).backward()
    seconds = time.perf_counter() - t
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--peak-of", choices=["on", "off"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak_of:
        _, seconds = step(args.peak_of == "on", args)
        print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          "seconds": seconds}))
        return 0
    runs = {}
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, __file__, "--peak-of", mode, "--batch-size", str(args.batch_size),
                              "--img-size", str(args.img_size)], capture_output=True, text=True, check=True)
        runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    g_off, _ = step(False, args)
    g_on, _ = step(True, args)
    diff = max((g_off[n] - g_on[n]).abs().max().item() for n in g_off)
    print(f"max abs gradient difference {diff:.2e}; peak RSS off {runs['off']['peak_mib']:.0f} MiB, "
          f"on {runs['on']['peak_mib']:.0f} MiB")
    md = (
        "## Gradient checkpointing (`benchmarks/grad_checkpointing.py`)\n\n"
        f"One VPTSP-G forward+backward (`cub200_small` model, ViT-S/16 shape, random weights), {args.img_size} px, "
        f"batch {args.batch_size}, fp32 on CPU; peak RSS of a fresh process per setting.\n\n"
        "| grad checkpointing | peak RSS (MiB) | seconds (fwd+bwd) |\n|---|---:|---:|\n"
        f"| off | {runs['off']['peak_mib']:.0f} | {runs['off']['seconds']:.1f} |\n"
        f"| on | {runs['on']['peak_mib']:.0f} | {runs['on']['seconds']:.1f} |\n\n"
        f"Largest absolute difference between the gradients of every trainable tensor: {diff:.2e} "
        "(tests require <= 1e-5 on the tiny model).\n")
    update_section("grad_checkpointing", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
