#!/usr/bin/env python
"""Draw docs/method.svg: the VPTSP-G method, each part labelled with the config keys that control it.

    python scripts/make_method_diagram.py                 # write docs/method.svg
    python scripts/make_method_diagram.py --out fig.png   # any format matplotlib writes (.svg, .png, .pdf)
    python scripts/make_method_diagram.py --check         # exit 1 if docs/method.svg is not what it would draw

Deterministic: fixed layout, no dates or version strings in the file, text kept as text (SVG), a fixed
SVG id salt. Explained in docs/method.md.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "docs" / "method.svg"

FROZEN = "#dfe6ee"
TRAINED = "#fde2c4"
BUFFER = "#d7efd9"
DATA = "#ffffff"
LOSS = "#f6d0d8"
BASE = "#eeeeee"
EDGE = "#4a4a4a"
KEY_COLOR = "#1f4e8c"


def box(ax, x, y, w, h, title, keys=(), color=TRAINED, note=None):
    """A rounded box at (x, y) (lower-left) with a bold title and the config keys below it."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.12",
                                facecolor=color, edgecolor=EDGE, linewidth=1.1))
    top = y + h - 0.22
    ax.text(x + w / 2, top, title, ha="center", va="top", fontsize=10.5, fontweight="bold", family="DejaVu Sans")
    cursor = top - 0.3
    if note:
        ax.text(x + w / 2, cursor, note, ha="center", va="top", fontsize=8.5, style="italic",
                family="DejaVu Sans", color="#333333")
        cursor -= 0.27
    for i, k in enumerate(keys):
        ax.text(x + w / 2, cursor - 0.24 * i, k, ha="center", va="top", fontsize=8.2, family="DejaVu Sans Mono",
                color=KEY_COLOR)
    return (x, y, w, h)


def arrow(ax, start, end, style="-|>", color=EDGE, ls="-", rad=0.0, text=None, text_xy=None):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=13, color=color, linewidth=1.2,
                                 linestyle=ls, connectionstyle=f"arc3,rad={rad}", shrinkA=2, shrinkB=2))
    if text:
        tx, ty = text_xy if text_xy else ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.12)
        ax.text(tx, ty, text, ha="center", va="bottom", fontsize=8.2, family="DejaVu Sans", color="#333333")


def right(b, dy=0.5):
    return (b[0] + b[2], b[1] + b[3] * dy)


def left(b, dy=0.5):
    return (b[0], b[1] + b[3] * dy)


def top(b, dx=0.5):
    return (b[0] + b[2] * dx, b[1] + b[3])


def bottom(b, dx=0.5):
    return (b[0] + b[2] * dx, b[1])


def draw() -> plt.Figure:
    plt.rcParams.update({"svg.hashsalt": "promptdml-method", "svg.fonttype": "none",
                         "font.family": "DejaVu Sans"})
    fig = plt.figure(figsize=(16, 9.6))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 16)
    ax.set_ylim(0, 9.6)
    ax.axis("off")

    ax.text(0.3, 9.3, "VPTSP-G: semantic proxies from visual prompts, and the config keys of each part",
            fontsize=14, fontweight="bold", va="top")
    ax.text(0.3, 8.88, "Embedding path (training and inference)", fontsize=10, color="#555555", va="top")
    ax.text(0.85, 5.55, "Semantic proxy path (training only)", fontsize=10, color="#555555", va="top")
    ax.plot([0.3, 15.7], [5.75, 5.75], color="#bbbbbb", linewidth=0.8, linestyle=(0, (4, 3)))

    # data
    img = box(ax, 0.3, 5.95, 2.2, 1.5, "Image batch", ["data.batch_size", "data.samples_per_class",
                                                       "data.dataset / root"], color=DATA,
              note="B/k classes x k images")

    # embedding path
    sp = box(ax, 2.9, 7.3, 3.2, 1.35, "Shared deep prompts",
             ["model.prompts.num_prompt", "prompt_depth / prompt_block_step"], note="n_i tokens before block i")
    vit1 = box(ax, 2.9, 5.95, 3.2, 1.15, "Frozen timm ViT", ["model.backbone.*"], color=FROZEN,
               note="BitFit biases trained: model.bitfit")
    head = box(ax, 6.6, 5.95, 2.6, 1.5, "Embedding head", ["model.embed_dim", "model.backbone.pool"],
               note="CLS -> LayerNorm -> Linear")
    emb = box(ax, 9.7, 5.95, 2.2, 1.5, "Embedding x", ["eval.recall_ks", "eval.*"], color=DATA,
              note="L2-normalised, used for retrieval")
    loss = box(ax, 12.7, 4.15, 3.0, 1.75, "Proxy Anchor loss",
               ["loss.alpha / loss.delta", "loss.proxy_range", "loss.normalization"], color=LOSS,
               note="pull x to its class proxy")
    arrow(ax, right(img), left(vit1))
    arrow(ax, bottom(sp), top(vit1), text="inserted, then dropped", text_xy=(5.25, 7.12))
    arrow(ax, right(vit1), left(head, 0.39))
    arrow(ax, right(head), left(emb))
    arrow(ax, right(emb, 0.25), top(loss, 0.12))

    # proxy path
    cp = box(ax, 2.9, 3.65, 3.2, 1.6, "Class prompts",
             ["model.prompts.num_p_prompt", "p_prompt_depth", "prompt_p_block_step"],
             note="table [C, m_i, D] per block: own class's rows")
    mb = box(ax, 0.85, 3.65, 1.8, 1.6, "Memory bank", ["model.memory_bank", "memory_bank_threshold"],
             color=BASE, note="table + optimiser on CPU")
    vit2 = box(ax, 2.9, 1.95, 3.2, 1.35, "Same frozen ViT", ["(second pass,", "shared BitFit biases)"],
               color=FROZEN, note="with class prompts instead")
    phead = box(ax, 6.6, 1.95, 2.6, 1.35, "Proxy head", ["model.embed_dim"], note="own LayerNorm + Linear -> q")
    gru = box(ax, 6.6, 3.65, 2.6, 1.6, "GRU container H",
              ["model.proxy.container_update", "model.proxy.rnn_dropout", "mix_keep_ratio"], color=BUFFER,
              note="buffer [C, E]: h = GRU(q_j, h)")
    pbias = box(ax, 9.7, 1.95, 2.2, 1.35, "Proxy bias P_bias", ["optim.lr_proxy", "proxy.bias_init_std"],
                note="learnable [C, E]")
    mix = box(ax, 9.7, 3.65, 2.2, 1.6, "Proxies P", ["model.proxy.", "proxy_bias_ratio (lambda)",
                                                      "model.proxy.semantic"],
              note="lambda P_bias + (1-lambda) H")
    ax.plot([0.55, 0.55], [5.95, 2.62], color=EDGE, linewidth=1.2, linestyle="--")
    arrow(ax, (0.55, 2.62), left(vit2, 0.5), ls="--", text="same images", text_xy=(1.7, 2.68))
    arrow(ax, right(mb), left(cp), style="<|-|>", ls=":")
    arrow(ax, bottom(cp), top(vit2), text="by label", text_xy=(5.0, 3.38))
    arrow(ax, right(vit2), left(phead))
    arrow(ax, top(phead), bottom(gru), text="q [B/k, k, E]", text_xy=(8.35, 3.38))
    arrow(ax, right(gru), left(mix))
    arrow(ax, top(pbias), bottom(mix))
    arrow(ax, right(mix), left(loss, 0.35))

    # optimisation and baselines
    box(ax, 12.7, 6.3, 3.0, 2.35, "Optimisation", ["optim.optimizer / lr", "optim.lr_proxy", "optim.weight_decay",
                                                     "optim.scheduler / t_max", "train.epochs / precision"],
        color=BASE, note="2 optimisers: all / P_bias")
    box(ax, 12.7, 1.0, 3.0, 2.75, "Baselines (configs/*_<name>)",
        ["model.adapter.bottleneck", "model.lora.rank", "model.full_finetune", "model.bitfit (alone)",
         "prompt_depth=1 (VPT-shallow)", "model.proxy.semantic=false", "  (plain proxies)"],
        color=BASE, note="replace prompts or proxies")

    ax.text(0.3, 1.45, "Inference: image -> prompted frozen ViT -> embedding head -> x (the proxy path is "
            "not run).\nCheckpoint (model.safetensors): every trained tensor + the container H + the config.",
            fontsize=9, va="top", color="#333333")
    handles = [Patch(facecolor=TRAINED, edgecolor=EDGE, label="trained"),
               Patch(facecolor=FROZEN, edgecolor=EDGE, label="frozen backbone"),
               Patch(facecolor=BUFFER, edgecolor=EDGE, label="buffer (updated, not a gradient step)"),
               Patch(facecolor=LOSS, edgecolor=EDGE, label="loss"),
               Patch(facecolor=BASE, edgecolor=EDGE, label="options")]
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.02, 0.005), ncol=5, fontsize=9,
              frameon=False)
    return fig


def render(fmt: str) -> bytes:
    fig = draw()
    buf = io.BytesIO()
    metadata = {"Date": None, "Creator": "scripts/make_method_diagram.py"} if fmt == "svg" else \
        ({"Software": None} if fmt == "png" else {"Creator": None, "Producer": None, "CreationDate": None})
    fig.savefig(buf, format=fmt, metadata=metadata, dpi=110)
    plt.close(fig)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output file (.svg, .png or .pdf)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the output file differs from a fresh drawing")
    args = parser.parse_args(argv)
    out = Path(args.out)
    data = render(out.suffix.lstrip(".").lower() or "svg")
    if args.check:
        if out.is_file() and out.read_bytes() == data:
            print(f"{out} is up to date")
            return 0
        print(f"error: {out} differs from what scripts/make_method_diagram.py draws; regenerate it with "
              f"python scripts/make_method_diagram.py --out {out}", file=sys.stderr)
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
