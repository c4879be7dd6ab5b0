"""PNG summary of a run: loss and retrieval metrics over epochs (needs matplotlib, the ``viz`` extra)."""

from __future__ import annotations

from pathlib import Path

from promptdml.extras import require


def plot_history(history: list[dict[str, float]], path: str | Path,
                 before: dict[str, float] | None = None) -> None:
    """Loss (left) and every evaluated metric (right) against the epoch.

    ``before``: the frozen backbone's test metrics (``eval.before_training``), drawn at epoch 0 as hollow
    markers joined to the metric's first evaluated epoch by a dotted line. Epoch ticks are whole numbers, the
    legend sits below the axes and the metric axis leaves room above 1.0, so no marker hides under the frame.
    """
    if not history:
        return
    matplotlib = require("matplotlib", "the training plot (training.png)", "viz")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4.6))
    epochs = [int(r["epoch"]) for r in history]
    ax_loss.plot(epochs, [r["loss"] for r in history], marker="o", color="black")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("mean training loss")
    ax_loss.set_title("Proxy Anchor loss")
    ax_loss.grid(alpha=0.3)

    metric_keys = _ordered_metric_keys(history)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    baseline = False
    for i, key in enumerate(metric_keys):
        colour = colours[i % len(colours)]
        pts = [(int(r["epoch"]), r[key]) for r in history if key in r]
        style = "-" if key.startswith("test_") else "--"
        ax_metric.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle=style, color=colour,
                       label=key.replace("_", " ", 1))
        name = key.split("_", 1)[1]
        if before and key.startswith("test_") and name in before and pts:
            baseline = True
            ax_metric.plot([0, pts[0][0]], [before[name], pts[0][1]], linestyle=":", color=colour)
            ax_metric.plot([0], [before[name]], marker="o", markerfacecolor="white", color=colour)
    ax_metric.set_xlabel("epoch" + (" (0 = frozen backbone, hollow markers)" if baseline else ""))
    ax_metric.set_title("retrieval metrics")
    ax_metric.set_ylim(0, 1.05)
    ax_metric.grid(alpha=0.3)
    last = max(epochs)
    for ax, first in ((ax_loss, min(epochs)), (ax_metric, 0 if baseline else min(epochs))):
        if last - first <= 16:  # whole epochs only, also for one or two epochs
            ax.set_xticks(range(first, last + 1))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        pad = max(0.5, 0.04 * (last - first))
        ax.set_xlim(first - pad, last + pad)
    if metric_keys:
        ax_metric.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=min(4, len(metric_keys)),
                         frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _ordered_metric_keys(history: list[dict[str, float]]) -> list[str]:
    """test_ before val_; Recall@K by K, then MAP@R and the rest, in first-seen order."""
    keys: list[str] = []
    for r in history:
        keys += [k for k in r if k.startswith(("test_", "val_")) and k not in keys]

    def order(key: str) -> tuple[int, int, float, str]:
        split, name = key.split("_", 1)
        if name.startswith("recall@"):
            try:
                return (split != "test", 0, float(name[7:]), name)
            except ValueError:
                pass
        return (split != "test", 1, keys.index(key), name)

    return sorted(keys, key=order)
