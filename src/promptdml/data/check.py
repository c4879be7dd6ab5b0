"""``promptdml data check``: a readable report of a dataset's splits and problems."""

from __future__ import annotations

from .records import Splits
from .sources import build_splits

__all__ = ["check_dataset", "format_report"]


def format_report(splits: Splits, max_problems: int = 200) -> str:
    lines = [f"dataset: {splits.name}", f"root:    {splits.root}",
             f"protocol: {'test set against itself' if splits.protocol == 'self' else 'query against gallery'}"]
    total = 0
    for name, rec in splits.named_splits():
        total += len(rec)
        lines.append(f"  {name:<8} {rec.summary()}")
        if name in ("test", "val", "query"):
            counts = rec.class_counts()
            single = int((counts == 1).sum())
            if single:
                lines.append(f"           {single} class(es) with a single image (skipped as queries by the metrics)")
    lines.append(f"  total    {total} images")
    n = len(splits.problems)
    if n == 0:
        lines.append("problems: none")
    else:
        lines.append(f"problems: {n}")
        lines.extend(f"  - {p}" for p in splits.problems[:max_problems])
        if n > max_problems:
            lines.append(f"  ... and {n - max_problems} more")
    return "\n".join(lines)


def check_dataset(cfg, verify_images: bool = True) -> str:
    """Build the splits of ``cfg`` (a DataConfig) and report classes / images per split and every problem.

    ``verify_images=True`` decodes every image completely (slow on large datasets; catches truncated
    files); ``False`` only checks that files exist and have a recognisable image header. Raises
    :class:`DataError` when the dataset cannot be used at all (the message says how to fix it).
    """
    splits = build_splits(cfg, check_images="full" if verify_images else "header")
    return format_report(splits)

