"""Training-step speed of VPTSP-G against the floor of two prompted forward+backward passes.

    python benchmarks/train_speed.py                      # both settings, CPU, the configs' precision
    python benchmarks/train_speed.py --settings small     # only cub200_small at 224 px, batch 16

The method needs two passes of the frozen prompted ViT per step (shared prompts for the embedding, class
prompts for the proxies). The floor is exactly those two eager forward+backward passes over the same batch,
with nothing else (no heads, GRU, loss or optimiser). Measured in one process, interleaved (machine load
affects all alike), for each setting (``cub200_small`` at 224 px / batch 16 and ``recommended`` at 84 px /
batch 64):

- floor: the two eager passes;
- eager: ``Trainer.train_step`` with ``model.backbone.fused_branches=false`` (two backbone passes);
- compiled: the same with ``train.compile=true``;
- fused: ``fused_branches=true`` (one backbone call for both branches);
- fused+compiled: both.

All variants start from the same weights and train on the same batch; the first 3 steps check that the
trained weights equal the eager step's (relative difference of all trainable weights together, and the
worst single tensor) and include the one-off compilation, reported as compile seconds (first steps minus
steady steps). Weights are random (speed does not depend on them). Peak memory of the floor and the eager
and fused steps is measured in subprocesses (the compiled variants would compile again there).
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


def build(args: argparse.Namespace, overrides: dict | None = None):
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
        "train.device": args.device, "train.precision": args.precision, **(overrides or {})})
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


VARIANTS = {  # name: (fused_branches, compile)
    "eager": (False, False), "compiled": (False, True), "fused": (True, False), "fused+compiled": (True, True)}
SETTINGS = {"small": ("cub200_small", 224, 16), "recommended": ("recommended", 84, 64),
            "smoke": ("demo", 28, 8)}  # smoke: a seconds-long check that the script runs
EQUALITY_STEPS = 3


def peak_rss_mib() -> float:
    """This process's peak resident memory. Linux: VmHWM of /proc/self/status (the high-water mark of this
    program's own address space; ``ru_maxrss`` of a child started by a large parent reports the parent's RSS
    at the fork when that was larger). Elsewhere ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def run_peak(args: argparse.Namespace, mode: str) -> float:
    cmd = [sys.executable, __file__, "--peak-of", mode, "--config", args.config, "--batch-size",
           str(args.batch_size), "--img-size", str(args.img_size), "--precision", args.precision,
           "--classes", str(args.classes), "--device", args.device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


FORWARD_STATE = ("proxies.container", "running_mean")  # written by the forward pass, not by an optimiser


def weight_difference(state: dict, ref: dict) -> tuple[float, float, float, str]:
    """(||w - w_ref|| / ||w_ref|| over all optimiser-trained tensors together, the same over the state the
    forward pass writes (proxy container rows, centring running means), the worst single trained tensor's
    relative difference, its name)."""
    def rel(names: list[str]) -> float:
        if not names:
            return 0.0
        x = torch.cat([state[n].double().flatten().cpu() for n in names])
        y = torch.cat([ref[n].double().flatten().cpu() for n in names])
        return ((x - y).norm() / y.norm().clamp_min(1e-30)).item()

    names = [n for n in ref if ref[n].is_floating_point()]
    trained = [n for n in names if not n.endswith(FORWARD_STATE)]
    written = [n for n in names if n.endswith(FORWARD_STATE)]
    worst = max((((state[n].double() - ref[n].double()).norm() / ref[n].double().norm().clamp_min(1e-30)).item(), n)
                for n in trained)
    return rel(trained), rel(written), worst[0], worst[1]


def measure(args: argparse.Namespace) -> dict:
    """One setting: all variants and the floor, interleaved."""
    trainers = {}
    for name, (fused, compiled) in VARIANTS.items():
        trainers[name], images, labels = build(args, {"model.backbone.fused_branches": fused,
                                                      "train.compile": compiled})
    start = {k: v.clone() for k, v in trainers["eager"].model.state_dict().items()}
    for t in trainers.values():  # identical weights in every variant
        t.model.load_state_dict(start)
    first: dict[str, list[float]] = {}
    for name, t in trainers.items():
        first[name] = [timed(t.train_step, images, labels) for _ in range(EQUALITY_STEPS)]
        print(f"  {name}: first {EQUALITY_STEPS} steps {', '.join(f'{s:.2f}' for s in first[name])} s", flush=True)
    ref = trainers["eager"].model.trainable_state()
    equality = {name: weight_difference(t.model.trainable_state(), ref) for name, t in trainers.items()
                if name != "eager"}
    floor_model = trainers["eager"]
    for _ in range(args.warmup):
        floor_step(floor_model, images, labels)
    times: dict[str, list[float]] = {"floor": [], **{n: [] for n in trainers}}
    for _ in range(args.steps):
        times["floor"].append(timed(floor_step, floor_model, images, labels))
        for name, t in trainers.items():
            times[name].append(timed(t.train_step, images, labels))
    med = {k: statistics.median(v) for k, v in times.items()}
    compile_s = {name: sum(first[name]) - EQUALITY_STEPS * med[name] for name, (_, c) in VARIANTS.items() if c}
    fell_back = [name for name, (_, c) in VARIANTS.items() if c and not trainers[name].model.backbone.compiled]
    return {"median": med, "compile_s": compile_s, "equality": equality, "fell_back": fell_back,
            "dtype": str(trainers["eager"].dtype).replace("torch.", "") if trainers["eager"].dtype else "fp32"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="small,recommended", help="comma-separated: small, recommended (smoke: tiny)")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    ap.add_argument("--device", default="cpu", help="cpu, cuda, mps (GPU checks: benchmarks/gpu_check.sh)")
    ap.add_argument("--section", default="train_speed", help="BENCHMARKS.md section to write")
    ap.add_argument("--classes", type=int, default=100, help="training classes (class-prompt table rows)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (after the equality steps)")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up steps of the floor")
    ap.add_argument("--no-peak", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--config", default="cub200_small", help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=16, help=argparse.SUPPRESS)
    ap.add_argument("--img-size", type=int, default=224, help=argparse.SUPPRESS)
    ap.add_argument("--peak-of", choices=["floor", "eager", "fused"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak_of:
        trainer, images, labels = build(args, {"model.backbone.fused_branches": args.peak_of == "fused"})
        base = peak_rss_mib()
        for _ in range(2):
            floor_step(trainer, images, labels) if args.peak_of == "floor" else trainer.train_step(images, labels)
        peak = peak_rss_mib()
        if trainer.device.type == "cuda":  # device memory is what matters on a GPU
            peak = torch.cuda.max_memory_allocated(trainer.device) / 2**20
        print(json.dumps({"peak_mib": peak, "before_mib": base}))
        return 0
    rows, notes = [], []
    for key in args.settings.split(","):
        args.config, args.img_size, args.batch_size = SETTINGS[key]
        print(f"{args.config}: {args.img_size} px, batch {args.batch_size}", flush=True)
        r = measure(args)
        peaks = {} if args.no_peak else {m: run_peak(args, m) for m in ("floor", "eager", "fused")}
        f = r["median"]["floor"]
        for name in ["floor", *VARIANTS]:
            s = r["median"][name]
            eq = r["equality"].get(name)
            rows.append(f"| {args.config}, {args.img_size} px, batch {args.batch_size} | {name} | {s:.3f} | "
                        f"{s / f:.3f} | {r['compile_s'][name]:.0f} |" if name in r["compile_s"] else
                        f"| {args.config}, {args.img_size} px, batch {args.batch_size} | {name} | {s:.3f} | "
                        f"{s / f:.3f} | - |")
            rows[-1] += (f" {eq[0]:.1e} | {eq[1]:.1e} |" if eq else " - | - |")
            rows[-1] += f" {peaks[name]:.0f} |" if name in peaks else " - |"
            print(rows[-1], flush=True)
        best = min(VARIANTS, key=lambda n: r["median"][n])
        notes.append(f"{args.config} at {args.img_size} px / batch {args.batch_size} ({r['dtype']}): best "
                     f"**{best}, {r['median'][best] / f:.3f}x the floor**"
                     + (f"; compile fell back to eager: {', '.join(r['fell_back'])}" if r["fell_back"] else ""))
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    shared = ("the machine was shared with other jobs, so absolute times are inflated: compare ratios, measured "
              "interleaved in one run" if load == "?" or float(load) > 1.5 * torch.get_num_threads() else
              "a quiet machine; ratios are measured interleaved in one run")
    md = (
        f"## Training speed ({args.device}; `benchmarks/train_speed.py`)\n\n"
        f"ViT-S shapes with random weights, the configs' precision (`{args.precision}`: bf16 autocast on CPU), "
        f"{args.classes} training classes, {args.device} ({torch.get_num_threads()} threads, load average {load} at "
        f"the end; {shared}). Floor = two eager forward+backward passes of the frozen prompted ViT over the "
        f"batch (shared prompts, class prompts). Each variant first takes {EQUALITY_STEPS} steps from the same "
        f"weights on the same batch (they include compilation), then median of {args.steps} interleaved steps. "
        "Compile s = those first steps minus as many steady steps. After the first "
        f"{EQUALITY_STEPS} steps, vs eager: *trained weights* = relative difference of all tensors an optimiser "
        "updates, together (prompts, biases, heads, GRU, proxy bias, class-prompt rows); *forward state* = the "
        "same for what the forward pass writes (the proxy container rows, which are the GRU's outputs, and the "
        "centring running means): activations, so in bf16 they differ by the format's rounding (2^-8 relative) "
        "wherever an input differs in its last bit.\n\n"
        "| setting | step | s/step | / floor | compile s | trained weights vs eager | forward state vs eager "
        "| peak RSS (MiB) |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n\n"
        + "\n".join(f"- {n}" for n in notes) + "\n\nTargets: best <= 0.8x the floor at 84 px / batch 64, <= 0.95x "
        "at 224 px / batch 16; trained weights within 1e-4 (bf16) or 1e-6 (fp32) of the eager step's.\n")
    update_section(args.section, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
