"""Parameter-efficient tuners, registered by name (in the style of peft's ``register_peft_method``).

A :class:`Tuner` says when it is on (from the model config), how it attaches to the frozen timm ViT, which
module the model then owns for it (its trainable group), whether it changes the backbone's features and
whether it can be merged into the backbone weights. :class:`~promptdml.models.PromptDMLModel` attaches every
registered tuner that is on, in registration order, and groups the trainable parameters by these owners.

Adding a tuner is one registration (see ``docs/architecture.md``)::

    from promptdml.models.tuners import Tuner, register_tuner

    register_tuner(Tuner("my_tuner", attach=lambda site: MyModule(site.vit, site.cfg),
                         enabled=lambda cfg: True))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

from promptdml.config import ModelConfig
from promptdml.models.peft import LoRA, ParallelAdapters
from promptdml.models.prompts import DeepPrompts, prompt_counts
from promptdml.registry import TUNERS


@dataclass
class Site:
    """Where a tuner attaches: the frozen timm ViT, its depth and width, and the model config."""

    vit: nn.Module
    depth: int
    width: int
    cfg: ModelConfig


@dataclass(frozen=True)
class Tuner:
    name: str
    attach: Callable[[Site], nn.Module | None]
    """Attach to ``site.vit``; returns the module the model owns (its parameters are the tuner's group), or
    None for a tuner that only unfreezes backbone parameters (its group: the backbone's trainable ones)."""
    enabled: Callable[[ModelConfig], bool]
    attr: str | None = None
    """Model attribute that holds the returned module (names its checkpoint keys); default: the name."""
    group: str | None = None
    """Trainable-group name (parameter report, model card); default: the name."""
    touches_backbone: bool = True
    """Changes the backbone's features on the embedding path (held by optim.head_warmup_epochs, scaled by
    optim.backbone_lr_scale)."""
    merges: bool | None = None
    """True: ``module.merge_into_backbone()`` folds it into the frozen weights; False: it cannot be merged (that
    call raises MergeError); None: nothing to merge."""
    before_heads: bool = False
    """Attach before the heads are built (the shared prompts: keeps the original initialisation order)."""
    label: Callable[[ModelConfig], str] | None = None
    """Its part of the method's name on the model card (None: the name)."""
    config: type | None = None
    """Its config dataclass (the section of ModelConfig it reads), for documentation."""

    @property
    def owner(self) -> str:
        return self.attr or self.name

    @property
    def group_name(self) -> str:
        return self.group or self.name


def register_tuner(tuner: Tuner, override: bool = False) -> Tuner:
    """Register ``tuner`` under its name; models built afterwards attach it when ``tuner.enabled(cfg)``."""
    return TUNERS.register(tuner.name, tuner, override=override)


def tuners() -> list[Tuner]:
    return [t for _, t in TUNERS.items()]


def enabled_tuners(cfg: ModelConfig) -> list[Tuner]:
    return [t for t in tuners() if t.enabled(cfg)]


def _vpt(site: Site) -> nn.Module:
    p = site.cfg.prompts
    return DeepPrompts(prompt_counts(p.num_prompt, p.prompt_depth, p.prompt_block_step, site.depth), site.width)


def _unfreeze(select: Callable[[str], bool]) -> Callable[[Site], None]:
    def attach(site: Site) -> None:
        for name, param in site.vit.named_parameters():
            if select(name):
                param.requires_grad_(True)
    return attach


def _vpt_label(m: ModelConfig) -> str:
    if not m.prompts.num_prompt:
        return ""
    return "VPT-shallow" if m.prompts.prompt_depth == 1 else "VPT-deep"


# The shared prompts are always attached (the embedding path's forward reads them; with num_prompt=0 they hold
# no tokens), so that the forward pass is the same for every method.
register_tuner(Tuner("vpt", _vpt, enabled=lambda m: True, attr="shared_prompts", group="shared_prompts",
                     before_heads=True, label=_vpt_label))
register_tuner(Tuner("bitfit", _unfreeze(lambda n: n.endswith("bias")),
                     enabled=lambda m: m.bitfit and not m.full_finetune, label=lambda m: "BitFit"))
register_tuner(Tuner("full", _unfreeze(lambda n: True), enabled=lambda m: m.full_finetune,
                     group="backbone_full", label=lambda m: "full fine-tuning"))
register_tuner(Tuner("adapter", lambda s: ParallelAdapters(s.vit.blocks, s.width, s.cfg.adapter),
                     enabled=lambda m: m.adapter.bottleneck > 0, attr="adapters", merges=False,
                     label=lambda m: f"adapter (bottleneck {m.adapter.bottleneck})"))
register_tuner(Tuner("lora", lambda s: LoRA(s.vit.blocks, s.cfg.lora), enabled=lambda m: m.lora.rank > 0, attr="lora",
                     merges=True, label=lambda m: f"LoRA (rank {m.lora.rank})"))


def method_parts(m: ModelConfig) -> list[str]:
    """The enabled tuners' names on the model card, in order (full fine-tuning first)."""
    labels = [t.label(m) if t.label else t.name for t in enabled_tuners(m)]
    full = [x for x in labels if x == "full fine-tuning"]
    return full + [x for x in labels if x and x != "full fine-tuning"]
