"""Class-prompt sources whose size does not grow like the table's (``model.class_prompts.source``).

The ``table`` source (:class:`~promptdml.models.prompts.ClassPrompts`) holds ``C x T x D`` free parameters
(T = class prompts summed over the blocks, D the backbone width): 13.2M at 956 classes, 261M at SOP's 11,318
with ViT-S and 3 prompts in 12 blocks. The sources here give every class its prompts from fewer parameters:

- :class:`LowRankClassPrompts` (``lowrank``): a code ``[r]`` per class times bases ``[r, m_i * D]`` shared by
  all classes, ``C r + r T D`` parameters;
- :class:`GeneratedClassPrompts` (``generated``): a small network maps a per-class *descriptor* (the class's
  mean frozen-backbone feature, a buffer computed once from the training images) to the prompts,
  ``2F + F h + h + h T D + T D`` parameters whatever C, plus ``C r + r T D`` with the low-rank residual.

Both are built like the table, ``source(num_classes, counts, dim, memory_bank=..., cfg=..., feature_dim=...)``,
and their ``forward(labels)`` returns each block's prompts ``[B, m_i, D]`` (None for blocks without any). Their
parameters are ordinary dense parameters: the main optimiser trains them, distributed training all-reduces
their gradients, and no row optimiser or memory bank is involved (``memory_bank`` must be False). Each is
initialised so that its prompts have the table's per-block scale (``_prompt_std(m_i, D)``).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn

from promptdml.config import ClassPromptConfig
from promptdml.models.prompts import _prompt_std


def _no_bank(memory_bank: bool, name: str) -> None:
    if memory_bank:
        raise ValueError(f"the memory bank holds the class-prompt table's rows; the {name} source has none "
                         f"(set model.memory_bank=off or model.class_prompts.source=table)")


def _split(flat: torch.Tensor, counts: list[int], dim: int) -> list[torch.Tensor | None]:
    """``[B, T * D]`` -> each block's ``[B, m_i, D]`` (None where m_i = 0)."""
    per_sample = flat.view(flat.shape[0], -1, dim)
    out, o = [], 0
    for m in counts:
        out.append(per_sample[:, o:o + m] if m > 0 else None)
        o += m
    return out


class LowRankClassPrompts(nn.Module):
    """``lowrank``: class c's prompts are ``codes[c] @ basis`` (``[r] x [r, T * D]``), viewed per block.

    Parameters ``codes`` ``[C, r]`` and ``basis`` ``[r, T * D]``: ``C r + r T D`` in all. Initialisation: codes
    N(0, 1/r) (std ``1/sqrt(r)``) and block i's columns of the basis N(0, s_i^2) with s_i = ``_prompt_std(m_i,
    D)``, the table's per-block std; an element of a prompt is a sum of r products of independent zero-mean
    factors, so its variance is ``r * (1/r) * s_i^2 = s_i^2``, the table's. ``zero_basis`` starts the basis at
    zero instead (prompts exactly 0: the residual of :class:`GeneratedClassPrompts`)."""

    def __init__(self, num_classes: int, counts: list[int], dim: int, memory_bank: bool = False,
                 cfg: ClassPromptConfig | None = None, feature_dim: int | None = None,
                 zero_basis: bool = False) -> None:
        super().__init__()
        _no_bank(memory_bank, "lowrank")
        rank = (cfg or ClassPromptConfig()).rank
        self.counts, self.dim, self.rank = list(counts), dim, rank
        total = sum(counts)
        self.codes = nn.Parameter(torch.randn(num_classes, rank if total else 0) / math.sqrt(rank))
        basis = torch.zeros(rank if total else 0, total, dim)
        if not zero_basis:
            o = 0
            for m in counts:
                if m:
                    basis[:, o:o + m].normal_(0.0, _prompt_std(m, dim))
                o += m
        self.basis = nn.Parameter(basis.view(basis.shape[0], total * dim))

    @property
    def num_classes(self) -> int:
        return self.codes.shape[0]

    def flat(self, labels: torch.Tensor) -> torch.Tensor:
        """Each sample's prompts of all blocks, ``[B, T * D]``."""
        return self.codes.index_select(0, labels) @ self.basis

    def forward(self, labels: torch.Tensor) -> list[torch.Tensor | None]:
        """Per-block prompts ``[B, m_i, D]`` of each sample's class."""
        if not sum(self.counts):
            return [None] * len(self.counts)
        return _split(self.flat(labels), self.counts, self.dim)

    def parameter_groups(self, prefix: str = "") -> list[tuple[str, list[tuple[str, nn.Parameter]]]]:
        """The groups of ``promptdml info``: the per-class codes, the shared bases."""
        return [("class_codes", [(prefix + "codes", self.codes)]), ("prompt_bases", [(prefix + "basis", self.basis)])]

    def describe(self) -> str:
        return f"lowrank, rank {self.rank}: class_codes C x r, prompt_bases r x T x D"


@functools.cache
def gelu_second_moment() -> float:
    """``E[GELU(z)^2]`` for z ~ N(0, 1) (about 0.4252), by quadrature."""
    z = torch.linspace(-12.0, 12.0, 48001, dtype=torch.float64)
    density = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return float(torch.trapezoid(torch.nn.functional.gelu(z) ** 2 * density, z))


class GeneratedClassPrompts(nn.Module):
    """``generated``: class c's prompts are produced from its descriptor by a small trained network.

    ``descriptor`` ``[C, F]`` (a buffer, not trained; saved in checkpoints) is each class's mean
    frozen-backbone feature over its training images (F = the backbone's feature width), set once before
    training by :meth:`set_class_features` (``engine/factory.py``; minus the mean over the classes with
    ``center_descriptors``). Until then it holds fixed random rows (a generator of its own, so the run's random
    stream is not touched). The network ``LayerNorm(F) -> Linear(F, h) -> GELU -> Linear(h, T * D)`` gives
    ``[T * D]`` per class, viewed per block and multiplied by block i's fixed scale ``s_i / sqrt(E[GELU(z)^2])``
    (s_i = ``_prompt_std(m_i, D)``): the LayerNorm output has unit mean square, the first Linear (N(0, 1/F),
    zero bias) makes each hidden pre-activation N(0, 1), the second (N(0, 1/h), zero bias) gives outputs of
    variance ``E[GELU(z)^2]``, so the initial prompts have the table's per-block std. Parameters: ``2F + F h + h
    + h T D + T D``, independent of C. Every class, also one never in a batch, gets prompts from its
    descriptor.

    ``generated_residual``: plus a :class:`LowRankClassPrompts` residual (``C r + r T D``), its basis zero at
    the start (the initial prompts are the generated ones)."""

    wants_class_features = True
    """:func:`promptdml.engine.factory.init_from_data` computes the class-mean features for it."""

    def __init__(self, num_classes: int, counts: list[int], dim: int, memory_bank: bool = False,
                 cfg: ClassPromptConfig | None = None, feature_dim: int | None = None) -> None:
        super().__init__()
        _no_bank(memory_bank, "generated")
        cfg = cfg or ClassPromptConfig(source="generated")
        self.counts, self.dim = list(counts), dim
        self.center = cfg.center_descriptors
        total = sum(counts)
        features, hidden = feature_dim or dim, cfg.hidden
        self.wants_class_features = total > 0
        placeholder = torch.randn(num_classes, features if total else 0, generator=torch.Generator().manual_seed(0))
        self.register_buffer("descriptor", placeholder)
        self.net: nn.Sequential | None = None
        if total:
            self.net = nn.Sequential(nn.LayerNorm(features), nn.Linear(features, hidden), nn.GELU(),
                                     nn.Linear(hidden, total * dim))
            for linear, fan_in in ((self.net[1], features), (self.net[3], hidden)):
                nn.init.normal_(linear.weight, 0.0, 1.0 / math.sqrt(fan_in))
                nn.init.zeros_(linear.bias)
        gain = 1.0 / math.sqrt(gelu_second_moment())
        self.scales = [_prompt_std(m, dim) * gain if m else 0.0 for m in counts]
        self.hidden = hidden
        self.residual = (LowRankClassPrompts(num_classes, counts, dim, cfg=cfg, zero_basis=True)
                         if cfg.generated_residual and total else None)

    @property
    def num_classes(self) -> int:
        return self.descriptor.shape[0]

    @torch.no_grad()
    def set_class_features(self, means: torch.Tensor) -> None:
        """Set the descriptors from the class-mean frozen-backbone features ``[C, F]``."""
        means = means.to(self.descriptor.dtype)
        if self.center:
            means = means - means.mean(dim=0, keepdim=True)
        self.descriptor.copy_(means)

    def forward(self, labels: torch.Tensor) -> list[torch.Tensor | None]:
        """Per-block prompts ``[B, m_i, D]`` of each sample's class."""
        if self.net is None:
            return [None] * len(self.counts)
        blocks = _split(self.net(self.descriptor.index_select(0, labels)), self.counts, self.dim)
        residual = (_split(self.residual.flat(labels), self.counts, self.dim) if self.residual is not None
                    else [None] * len(self.counts))
        out: list[torch.Tensor | None] = []
        for p, s, r in zip(blocks, self.scales, residual, strict=True):
            if p is not None:
                p = p * s
                if r is not None:
                    p = p + r
            out.append(p)
        return out

    def parameter_groups(self, prefix: str = "") -> list[tuple[str, list[tuple[str, nn.Parameter]]]]:
        """The groups of ``promptdml info``: the generator network, then the residual's codes and bases."""
        net = [] if self.net is None else list(self.net.named_parameters(prefix=prefix + "net"))
        groups = [("prompt_generator", net)]
        if self.residual is not None:
            groups += self.residual.parameter_groups(prefix + "residual.")
        return groups

    def describe(self) -> str:
        text = f"generated (hidden {self.hidden}) from class descriptors C x F (a buffer, not trained)"
        if self.residual is not None:
            text += f", low-rank residual of rank {self.residual.rank}"
        return text
