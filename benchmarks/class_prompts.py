"""Class-prompt sources (``model.class_prompts.source``: table, lowrank, generated) at a dataset's scale:
trainable parameters per group, class-prompt bytes on the device, and the time of a few training steps.

A skeleton: it measures cost only (a randomly initialised backbone, random images, the real
``Trainer.train_step``), not accuracy; the ``generated`` source keeps its placeholder descriptors (no data is
read). Each source runs in the calling process, one after the other.

    python benchmarks/class_prompts.py --smoke                  # tiny 2-block ViT, 40 classes, 2 steps: seconds
    python benchmarks/class_prompts.py --classes 11318 --steps 5   # sop_small settings (ViT-S/16), prints JSON
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "src" / "promptdml" / "configs" / "sop_small.yaml"
SOURCES = ("table", "lowrank", "generated")
SMOKE = {"model.backbone.name": "vit_tiny_patch16_224", "model.backbone.depth": 2, "model.embed_dim": 16,
         "model.prompts.num_prompt": 2, "model.prompts.prompt_depth": 2, "model.prompts.num_p_prompt": 2,
         "model.prompts.p_prompt_depth": 2, "model.class_prompts.hidden": 16, "model.class_prompts.rank": 4}


def run(source: str, args: argparse.Namespace) -> dict:
    import torch

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
                 "model.class_prompts.source": source, "model.memory_bank": "off",
                 "data.batch_size": args.batch_size, "data.samples_per_class": 2, "train.precision": args.precision,
                 "train.device": args.device, "train.progress": False, **(SMOKE if args.smoke else {})}
    cfg = load_config(CONFIG, overrides)
    device = resolve_device(cfg.train.device)
    model = create_model(cfg.model, args.classes).to(device).train()
    trainer = Trainer(cfg, parts=TrainParts(cfg=cfg, model=model, loss_fn=build_loss(cfg.loss),
                                            optimizers=build_optimizers(model, cfg), device=device))
    g = torch.Generator().manual_seed(1)
    times = []
    k = cfg.data.samples_per_class
    for _ in range(args.steps):
        labels = torch.randperm(args.classes, generator=g)[:args.batch_size // k].repeat_interleave(k)
        images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g)
        t0 = time.perf_counter()
        trainer.train_step(images, labels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    counts = count_parameters(model)
    class_groups = ("class_prompts", "class_codes", "prompt_bases", "prompt_generator")
    cp_bytes = sum(t.numel() * t.element_size() for n, t in model.trainable_state().items()
                   if n.startswith("class_prompts"))
    return {"source": source, "classes": args.classes,
            "class_prompt_params": {g: counts[g] for g in class_groups if g in counts},
            "trainable": counts["trainable"], "class_prompt_state_bytes": cp_bytes,
            "step_seconds": times[1:] if len(times) > 1 else times}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny backbone, 40 classes, 2 steps per source")
    p.add_argument("--classes", type=int, default=11_318)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    args = p.parse_args(argv)
    if args.smoke:
        args.classes, args.steps, args.batch_size, args.img_size = 40, 2, 8, 32
    rows = [run(s, args) for s in args.sources]
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
