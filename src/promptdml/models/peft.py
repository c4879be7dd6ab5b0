"""Parameter-efficient baselines attached to a frozen timm ViT by hooks: parallel adapters and LoRA.

Neither rebuilds any backbone module: the attention (any number of heads, its pretrained qkv bias, fused or
not) and the blocks run unchanged, and the state-dict names of the backbone stay timm's. The new weights
live in their own modules (``model.adapters``, ``model.lora``) so they are counted, optimised and
checkpointed as their own groups.

- :class:`ParallelAdapters` (AdaptFormer): for each block,
  ``x' = x + attn(norm1(x)); out = x' + mlp(norm2(x')) + s * up(drop(relu(down(x'))))``.
  The adapter input ``x'`` is captured by a pre-hook on ``norm2`` and its output added by a forward hook
  on the block. ``up`` is zero-initialised, so a fresh adapter leaves the backbone output unchanged.
  Adapters are non-linear, so they cannot be merged into the backbone weights.
- :class:`LoRA`: for each block's ``attn.qkv`` (a ``Linear``), ``y = W x + b + (alpha / r) * B A drop(x)``
  via a forward hook; ``A`` Kaiming-uniform, ``B`` zeros. :meth:`LoRA.merge_into_backbone` folds
  ``(alpha / r) * B A`` into ``W`` for inference.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from promptdml.config import AdapterConfig, LoRAConfig
from promptdml.errors import MergeError


class ParallelAdapter(nn.Module):
    """``scale * up(dropout(relu(down(x))))`` with ``up`` zero-initialised."""

    def __init__(self, dim: int, bottleneck: int, scale: float = 0.1, dropout: float = 0.0) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self._input: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(F.relu(self.down(x)))) * self.scale

    # hooks installed on the backbone block -------------------------------------------------------
    def _capture(self, module: nn.Module, args: tuple) -> None:
        self._input = args[0]

    def _add(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x, self._input = self._input, None
        if x is None:
            raise RuntimeError("parallel adapter: the block's norm2 was not called before its output; the block "
                               "is not a pre-norm timm Block")
        return output + self(x).to(output.dtype)


class ParallelAdapters(nn.ModuleList):
    """One :class:`ParallelAdapter` per block, attached with hooks (see the module docstring)."""

    def __init__(self, blocks: nn.ModuleList, dim: int, cfg: AdapterConfig) -> None:
        super().__init__(ParallelAdapter(dim, cfg.bottleneck, cfg.scale, cfg.dropout) for _ in blocks)
        self._handles = []
        for i, (block, adapter) in enumerate(zip(blocks, self, strict=True)):
            if not (hasattr(block, "norm2") and hasattr(block, "mlp") and hasattr(block, "attn")):
                raise ValueError(f"parallel adapters need timm pre-norm blocks (attn, norm2, mlp); block {i} is "
                                 f"{type(block).__name__}")
            if type(block).__name__ in ("ResPostBlock", "ParallelScalingBlock", "ParallelThingsBlock"):
                raise ValueError(f"parallel adapters do not support {type(block).__name__} blocks (norm2 does not "
                                 "see the residual stream)")
            self._handles.append(block.norm2.register_forward_pre_hook(adapter._capture))
            self._handles.append(block.register_forward_hook(adapter._add))

    def merge_into_backbone(self) -> None:
        raise MergeError("parallel adapters cannot be merged into the backbone: the branch "
                         "scale * up(relu(down(x))) is non-linear in x, so no change of the frozen weights "
                         "reproduces it. Keep the adapters as modules for inference (they add "
                         f"{sum(p.numel() for p in self.parameters()):,} parameters).")


class LoRALayer(nn.Module):
    """Low-rank update of one ``Linear``: ``(alpha / rank) * B A dropout(x)``."""

    def __init__(self, target: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, target.in_features))
        self.B = nn.Parameter(torch.zeros(target.out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.merged = False
        object.__setattr__(self, "_target", target)  # not a submodule: its weights belong to the backbone

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.A), self.B) * self.scaling

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return output
        return output + self.delta(args[0]).to(output.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        w = self._target.weight
        w.add_((self.B.float() @ self.A.float() * self.scaling).to(w.dtype))
        self.merged = True


class LoRA(nn.ModuleList):
    """One :class:`LoRALayer` on each block's ``attn.qkv``, attached with forward hooks."""

    def __init__(self, blocks: nn.ModuleList, cfg: LoRAConfig) -> None:
        layers = []
        for i, block in enumerate(blocks):
            qkv = getattr(getattr(block, "attn", None), "qkv", None)
            if not isinstance(qkv, nn.Linear):
                raise ValueError(f"LoRA needs an attention with a fused 'qkv' Linear; block {i} "
                                 f"({type(block).__name__}) has none")
            layers.append(LoRALayer(qkv, cfg.rank, cfg.alpha, cfg.dropout))
        super().__init__(layers)
        self._handles = [layer._target.register_forward_hook(layer._hook) for layer in self]

    @property
    def merged(self) -> bool:
        return all(layer.merged for layer in self)

    def merge_into_backbone(self) -> None:
        """``W += (alpha / rank) * B A`` for every qkv; the hooks then add nothing (inference only: the LoRA
        parameters stay, so a checkpoint of the merged model still loads into a fresh, unmerged one)."""
        for layer in self:
            layer.merge()
