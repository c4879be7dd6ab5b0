"""Name -> implementation registries (in the style of timm's ``register_model``), importable without torch.

The package registers its tuners (``models/tuners.py``), losses (``losses/``), class-prompt sources
(``models/prompts.py``) and datasets (``data/sources.py``) here; a user registers one more with a single call
and no edit of the package::

    from promptdml.registry import LOSSES

    @LOSSES.register("my_loss")
    def build(cfg):  # cfg: the LossConfig
        ...

An entry is either the object itself or a lazy ``"module:attribute"`` reference, imported on first use, so
that validating a config (which needs only the names) does not import torch.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


class Registry:
    """Ordered ``name -> object`` map; order is registration order (it orders e.g. the trainable groups)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str, obj: Any = None, *, override: bool = False) -> Any:
        """``register(name, obj)``, or ``@register(name)`` as a decorator; ``obj`` may be ``"module:attr"``."""
        if obj is None:
            return lambda o: self.register(name, o, override=override)
        if name in self._entries and not override:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._entries[name] = obj
        return obj

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def get(self, name: str) -> Any:
        if name not in self._entries:
            close = difflib.get_close_matches(str(name), self.names(), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise KeyError(f"unknown {self.kind} '{name}'; registered: {', '.join(self.names())}.{hint}")
        obj = self._entries[name]
        if isinstance(obj, str) and ":" in obj:
            module, attr = obj.split(":", 1)
            obj = self._entries[name] = getattr(importlib.import_module(module), attr)
        return obj

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self) -> Iterator[tuple[str, Any]]:
        for name in self.names():
            yield name, self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


LOSSES = Registry("loss")
"""``loss.name`` -> ``build(LossConfig) -> loss`` where ``loss(embeddings, labels, proxy_output)`` is a scalar."""
LOSSES.register("proxy_anchor", "promptdml.losses:build_proxy_anchor")
LOSSES.register("norm_softmax", "promptdml.losses:build_norm_softmax")

TUNERS = Registry("tuner")
"""Parameter-efficient tuners: name -> :class:`promptdml.models.tuners.Tuner` (registered by that module)."""

CLASS_PROMPT_SOURCES = Registry("class-prompt source")
"""Where the class prompts come from (``model.class_prompts.source``): name -> ``build(num_classes, counts,
dim, memory_bank=..., cfg=ClassPromptConfig, feature_dim=...) -> nn.Module`` whose ``forward(labels)`` gives
each block's prompts ``[B, m_i, D]`` (None where m_i = 0)."""
CLASS_PROMPT_SOURCES.register("table", "promptdml.models.prompts:ClassPrompts")
CLASS_PROMPT_SOURCES.register("lowrank", "promptdml.models.class_prompt_sources:LowRankClassPrompts")
CLASS_PROMPT_SOURCES.register("generated", "promptdml.models.class_prompt_sources:GeneratedClassPrompts")


@dataclass(frozen=True)
class DatasetSpec:
    """One ``data.dataset`` value: everything the package knows about a dataset, in one place.

    ``reader(cfg, with_test, progress)`` (cfg: the DataConfig) lists the candidate images as a
    :class:`promptdml.data.sources.Listing` of ``Candidate(path, class name, split or None, where listed)``;
    ``build_splits`` checks the files, splits unsplit classes by ``data.train_ratio`` and numbers the classes.
    """

    name: str
    reader: Callable[..., Any] | str
    """The reader, or a lazy ``"module:attribute"`` reference to it."""
    layout: str = ""
    """The expected layout on disk, named in data errors."""
    user_data: bool = False
    """The user's own data: a training class with a single image stops training (a benchmark keeps it)."""
    train_classes: int | Callable[[Any], int] | None = None
    """Number of training classes before the validation split (an int, or a function of the DataConfig), so
    that ``promptdml info`` can count parameters without reading the data; None = read the data."""

    def read(self, cfg: Any, with_test: bool = True, progress: bool = False) -> Any:
        reader = self.reader
        if isinstance(reader, str):
            module, attr = reader.split(":", 1)
            reader = getattr(importlib.import_module(module), attr)
        return reader(cfg, with_test, progress)

    def count_train_classes(self, cfg: Any) -> int | None:
        n = self.train_classes
        return n(cfg) if callable(n) else n


DATASETS = Registry("dataset")
"""``data.dataset`` -> :class:`DatasetSpec` (the package's own are defined in ``data/sources.py``); the config's
choices, the ``--dataset`` help and ``promptdml info`` all read this."""
for _name in ("demo", "folder", "csv", "cub200", "cars196", "online_products", "inshop", "inaturalist"):
    DATASETS.register(_name, f"promptdml.data.sources:{_name.upper()}")
del _name


def register_dataset(spec: DatasetSpec, *, override: bool = False) -> DatasetSpec:
    """Register a dataset under ``data.dataset = spec.name``."""
    return DATASETS.register(spec.name, spec, override=override)


def register_loss(name: str, build: Callable | None = None) -> Any:
    """Register a loss builder under ``loss.name = name`` (also usable as ``@register_loss(name)``)."""
    return LOSSES.register(name, build)
