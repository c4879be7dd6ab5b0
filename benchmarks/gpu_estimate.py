"""Compute per training run of every paper config, counted, and the GPU time it implies (an estimate).

    python benchmarks/gpu_estimate.py                      # writes the table into docs/reproduce.md
    python benchmarks/gpu_estimate.py --tflops 150         # assume a different sustained throughput

No GPU is needed: each config's model is built on PyTorch's ``meta`` device (shapes only, no memory, no
arithmetic), and ``torch.utils.flop_counter`` counts the floating-point operations of one real training
step (both prompted passes, heads, GRU, Proxy Anchor loss, backward) and of one evaluation forward.
Multiplied by the dataset sizes and epochs this gives the compute of a run. The time column divides it by
an assumed sustained throughput (``--tflops``, default 100 TFLOP/s: a conservative figure for bf16/fp16 on
an A100/H100-class GPU with ViT-sized matmuls) and ignores data loading, which can dominate for ViT-S on a
GPU with few CPU workers. Replace the estimates with measurements from ``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report import update_section  # noqa: E402

REPRODUCE_MD = HERE.parent / "docs" / "reproduce.md"

# training images, training classes and evaluated images (test set; InShop: query + gallery) of each benchmark
DATASETS = {
    "cub200": (5_864, 100, 5_924),
    "cars196": (8_054, 98, 8_131),
    "online_products": (59_551, 11_318, 60_502),
    "inshop": (25_882, 3_997, 14_218 + 12_612),
    "inaturalist": (325_846, 5_690, 136_093),
}
CONFIGS = ["cub200_small", "cub200_basic", "cars_small", "cars_basic", "sop_small", "sop_basic",
           "inshop_small", "inshop_basic", "inat_basic"]


def step_flops(cfg, num_classes: int) -> tuple[float, float]:
    """FLOPs of one training step (whole batch) and of one evaluation forward (per image)."""
    from promptdml.losses import ProxyAnchorLoss
    from promptdml.models import create_model

    b, k, size = cfg.data.batch_size, cfg.data.samples_per_class, cfg.model.backbone.img_size
    with torch.device("meta"):
        model = create_model(cfg.model, num_classes)
        images = torch.empty(b, 3, size, size)
    labels = torch.arange(b // k).repeat_interleave(k)  # real (CPU) labels: the model checks the batch layout
    # the batch-layout check reads the labels (CPU); downstream, meta tensors are indexed with meta ids (the
    # class-prompt lookup without its bookkeeping for the row-wise optimiser, which is not stepped here)
    cp = model.class_prompts

    def class_prompts(ids: torch.Tensor) -> list[torch.Tensor | None]:
        rows = cp.table.index_select(0, ids.to("meta"))
        return [rows[:, o:o + m] if m > 0 else None for o, m in zip(cp.offsets, cp.counts, strict=True)]

    cp.forward = class_prompts
    proxies_forward = model.proxies.forward
    model.proxies.forward = lambda ids, q: proxies_forward(ids.to("meta"), q)
    model.train()
    loss_fn = ProxyAnchorLoss(cfg.loss.alpha, cfg.loss.delta, cfg.loss.normalization)
    # the loss's boolean masks need nonzero(), which has no shape on meta: assume all set (negligible FLOPs)
    import torch.fx.experimental._config as fx_config

    fx_config.meta_nonzero_assume_all_nonzero = True
    counter = FlopCounterMode(display=False)
    with counter:
        out = model.forward_train(images, labels, k)
        proxies = out.proxy.proxies if cfg.loss.proxy_range == "both_all" else out.proxy.batch_proxies
        classes = None if cfg.loss.proxy_range == "both_all" else out.proxy.batch_classes
        loss_fn(out.embeddings, labels.to("meta"), proxies, classes).backward()
    train = counter.get_total_flops()
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(images[:1])
    return float(train), float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tflops", type=float, default=100.0, help="assumed sustained TFLOP/s")
    parser.add_argument("--print-only", action="store_true", help="print the table, do not write the docs")
    args = parser.parse_args()

    from promptdml.cli import resolve_config_path
    from promptdml.config import load_config

    rows = ["| config | backbone, px | train images x epochs | TFLOP / step (batch) | PFLOP / run (train + eval) "
            f"| est. GPU time at {args.tflops:g} TFLOP/s |", "|---|---|---|---|---|---|"]
    for name in CONFIGS:
        cfg = load_config(resolve_config_path(name), {"model.backbone.pretrained": False,
                                                      "model.memory_bank": "off"})
        n_train, n_classes, n_eval = DATASETS[cfg.data.dataset]
        train, evaluate = step_flops(cfg, n_classes)
        steps = cfg.train.epochs * (n_train // cfg.data.batch_size)
        # the trainer evaluates every eval.every epochs and after the last one
        evals = (cfg.train.epochs // cfg.eval.every if cfg.eval.every else 0) + 1
        total = steps * train + evals * n_eval * evaluate
        seconds = total / (args.tflops * 1e12)
        when = f"{seconds / 60:.0f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"
        rows.append(f"| `{name}` | {cfg.model.backbone.name.split('.')[0]}, {cfg.model.backbone.img_size} "
                    f"| {n_train:,} x {cfg.train.epochs} | {train / 1e12:.2f} | {total / 1e15:,.0f} | {when} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    text = (f"Counted by `python benchmarks/gpu_estimate.py` (meta device, `torch.utils.flop_counter`); the times "
            f"assume {args.tflops:g} TFLOP/s sustained and exclude data loading, so they are a lower bound "
            "for a well-fed GPU, not a measurement.\n\n" + table)
    if not args.print_only:
        update_section("gpu_estimate", text, REPRODUCE_MD)
        print(f"wrote the gpu_estimate section of {REPRODUCE_MD}")


if __name__ == "__main__":
    main()
