"""Normalised softmax (Zhai & Wu, BMVC 2019): cross-entropy over cosine similarities to the proxies."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class NormSoftmaxLoss(nn.Module):
    """``loss(embeddings, labels, proxies, proxy_classes=None)``: mean over the batch of
    ``-log softmax_j(s(x, p_j) / temperature)[label]`` with cosine similarity ``s``.

    Unlike Proxy Anchor it cannot be lowered by moving every embedding to one point: with all similarities
    equal the loss is log(number of proxies), its largest value for a given set of proxies.
    ``proxy_classes[j]`` is the class of proxy row j (default: row j is class j); every label must have one.
    """

    def __init__(self, temperature: float = 0.05) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, proxies: torch.Tensor,
                proxy_classes: torch.Tensor | None = None) -> torch.Tensor:
        logits = F.normalize(embeddings.float(), dim=-1) @ F.normalize(proxies.float(), dim=-1).t()
        if proxy_classes is None:
            target = labels
        else:
            match = labels[:, None] == proxy_classes[None, :]
            if not bool(match.any(dim=1).all()):
                raise ValueError("every label needs a proxy in proxy_classes")
            target = match.float().argmax(dim=1)
        return F.cross_entropy(logits / self.temperature, target)
