#!/usr/bin/env bash
# GPU checks for a lent CUDA machine (under 5 minutes): CUDA AMP (fp16 + grad scaling) training steps at the
# cub200_small (224 px, batch 16) and recommended (84 px, batch 64) settings on random data: the two-pass floor,
# the eager, compiled, fused and fused+compiled steps (s/step, ratio to the floor, compile seconds, weights vs
# the eager step, peak GPU memory), then evaluation throughput. Writes BENCHMARKS.md sections gpu_train_speed /
# gpu_eval. Usage: bash benchmarks/gpu_check.sh   (after pip install -e .)
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv || true
# floor / eager / compiled / fused / fused+compiled steps at both train_speed settings (3 equality steps, which
# include compilation, then 5 timed steps each), fp16 autocast as the configs use on CUDA
python benchmarks/train_speed.py --device cuda --precision auto --settings small,recommended \
  --steps 5 --warmup 2 --section gpu_train_speed
python - <<'PY'
import sys, time, torch
sys.path.insert(0, "benchmarks")
from report import update_section
from promptdml.cli import resolve_config_path
from promptdml.config import load_config
from promptdml.models import create_model
rows = []
for name in ("cub200_small", "cub200_basic"):
    cfg = load_config(resolve_config_path(name), {"model.backbone.pretrained": False})
    model = create_model(cfg.model, 100).to("cuda").eval()
    x = torch.randn(256, 3, 224, 224, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        for _ in range(3):
            model(x)
        torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(10):
            model(x)
        torch.cuda.synchronize()
    rows.append(f"| {name} | {2560 / (time.perf_counter() - t):.0f} |")
md = ("## GPU evaluation throughput (`benchmarks/gpu_check.sh`)\n\n"
      f"{torch.cuda.get_device_name()}, fp16 autocast, batch 256 at 224 px, embedding path only.\n\n"
      "| config | images/s |\n|---|---:|\n" + "\n".join(rows) + "\n")
update_section("gpu_eval", md)
print(md)
PY
