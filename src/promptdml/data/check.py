"""``promptdml data check``: a readable report of a dataset's splits and problems."""

from __future__ import annotations

from .records import Splits
from .sampler import batch_too_large
from .sources import build_splits

__all__ = ["check_dataset", "format_report", "inspect_dataset"]


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


def check_dataset(cfg, verify_images: bool = True, progress: bool = False) -> str:
    """Build the splits of ``cfg`` (a DataConfig) and report classes / images per split and every problem.

    ``verify_images=True`` decodes every image completely (slow on large datasets; catches truncated
    files); ``False`` only checks that files exist and have a recognisable image header. Raises
    :class:`DataError` when the dataset cannot be used at all (the message says how to fix it); problems that
    stop training but leave the splits readable (a training class with a single image) are listed in the report
    under "blocking"; a batch (``cfg.batch_size``) that needs more classes than there are gets a note (:func:`inspect_dataset` returns them separately).
    """
    return inspect_dataset(cfg, verify_images, progress)[0]


def inspect_dataset(cfg, verify_images: bool = True, progress: bool = False) -> tuple[str, list[str]]:
    """(report, blocking problems) of ``cfg`` (a DataConfig): :func:`check_dataset` with the problems that stop
    training listed separately, so that ``promptdml data check`` can exit with an error after reporting them all."""
    splits = build_splits(cfg, check_images="full" if verify_images else "header", strict=False, progress=progress)
    blocking = list(splits.blocking)
    report = format_report(splits)
    batch = batch_too_large(splits.train.num_classes, cfg.batch_size, cfg.samples_per_class)
    if batch:  # a note: the config used for training (--config, --batch-size) decides
        report += f"\nnote: {batch}"
    if blocking:
        report += f"\nblocking: {len(blocking)} (training would stop)\n" + "\n".join(f"  - {b}" for b in blocking)
    return report, blocking
