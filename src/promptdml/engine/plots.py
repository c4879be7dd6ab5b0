"""PNG summary of a run: loss and retrieval metrics over epochs."""

from __future__ import annotations

from pathlib import Path


def plot_history(history: list[dict[str, float]], path: str | Path) -> None:
    """Loss (left) and every evaluated metric (right) against the epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [r["epoch"] for r in history]
    ax_loss.plot(epochs, [r["loss"] for r in history], marker="o")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title("Proxy Anchor loss")
    metric_keys = sorted({k for r in history for k in r if k.startswith(("test_", "val_"))})
    for key in metric_keys:
        pts = [(r["epoch"], r[key]) for r in history if key in r]
        ax_metric.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    ax_metric.set_xlabel("epoch")
    ax_metric.set_title("retrieval metrics")
    ax_metric.set_ylim(0, 1)
    if metric_keys:
        ax_metric.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
