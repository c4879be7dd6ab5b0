#!/usr/bin/env bash
# GPU checks for a lent CUDA machine (under 5 minutes): CUDA AMP (fp16 + grad scaling) training steps of the
# cub200_small and cub200_basic settings at 224 px on random data (s/step, images/s, peak GPU memory,
# step/floor ratio), then evaluation throughput. Writes BENCHMARKS.md sections gpu_train_small / gpu_train_basic
# / gpu_eval. Usage: bash benchmarks/gpu_check.sh   (after pip install -e .)
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv || true
python benchmarks/train_speed.py --device cuda --precision fp16 --config cub200_small --batch-size 64 \
  --steps 10 --warmup 3 --section gpu_train_small
python benchmarks/train_speed.py --device cuda --precision fp16 --config cub200_basic --batch-size 64 \
  --steps 10 --warmup 3 --section gpu_train_basic
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
