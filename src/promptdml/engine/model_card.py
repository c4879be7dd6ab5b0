"""A short model card (README.md) written into every run directory."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from promptdml.config import Config, ModelConfig
from promptdml.files import atomic_write_text
from promptdml.text import plural


def method_name(m: ModelConfig) -> str:
    """Human-readable name of the trained parts, e.g. 'VPTSP-G (deep prompts + BitFit + semantic proxies)': the
    enabled tuners' labels (``models/tuners.py``), the head and the proxies."""
    from promptdml.models.tuners import method_parts

    semantic = "semantic proxies"
    if m.class_prompts.source != "table":
        semantic += f" from {m.class_prompts.source} class prompts"
    parts = method_parts(m) + ["head", semantic if m.proxy.semantic else "plain proxies"]
    name = " + ".join(parts)
    return f"VPTSP-G ({name})" if m.proxy.semantic else name


def write_model_card(run_dir: Path, cfg: Config, summary: dict[str, Any], class_count: int,
                     test_classes: int | None) -> Path:
    b, d = cfg.model.backbone, cfg.data
    source = summary.get("backbone_weights") or "the model hub (timm pretrained tag)"
    params = summary["parameters"]
    metrics, heading = summary.get("test") or {}, "Test metrics (last epoch)"
    if not metrics and summary.get("val"):  # trained without the test split (promptdml tune's trials)
        metrics, heading = summary["val"], "Validation metrics (last epoch; the test split was not built)"
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items())
    split = (f"classes sorted by name, first {d.train_ratio:.0%} train" if d.dataset in ("folder", "csv", "demo")
             else "the dataset's standard protocol")
    best = summary.get("best")
    best_line = (f"\nBest checkpoint (`checkpoints/best.safetensors`): epoch {best['epoch']}, selected by "
                 f"{best['selected_by']} = {best['value']:.4f} on the validation split.\n" if best else "")
    tests_line = "query/gallery protocol" if summary.get("test") else "none (the test split was not built)"
    text = f"""# Model card: {run_dir.name}

- **Backbone**: `{b.name}` at {b.img_size} px (frozen), weights from {source}
- **Method**: {method_name(cfg.model)}
- **Trainable parameters**: {params['trainable']:,} of {params['all']:,} ({100 * params['trainable'] / params['all']:.2f}%)
- **Embedding**: {cfg.model.embed_dim}-d, L2-normalised (CLS -> LayerNorm -> Linear)
- **Data**: `{d.dataset}` at `{d.root or '(default location)'}`: {class_count} training classes, {split};
  test classes: {test_classes if test_classes is not None else tests_line}
- **Training**: {plural(cfg.train.epochs, 'epoch')}, {cfg.optim.optimizer} lr {cfg.optim.lr:g} (proxies {cfg.optim.lr_proxy:g}),
  batch {d.batch_size} with {d.samples_per_class} images per class, {summary['precision']} on {summary['device']},
  {summary['train_seconds']:.0f} s; Proxy Anchor normalisation: {summary['loss_normalization']}

## {heading}

| metric | value |
|---|---|
{rows}
{best_line}
## Reproduce

Train again into a new run directory next to this one (this run is never overwritten), and evaluate this run:

```bash
promptdml train --config {shlex.quote(str(run_dir.absolute() / 'config.yaml'))} --output-dir {shlex.quote(str(run_dir.absolute().parent))} --name {shlex.quote(run_dir.name + '-reproduced')}
promptdml evaluate --run {shlex.quote(str(run_dir.absolute()))}
```
"""
    return atomic_write_text(run_dir / "README.md", text)
