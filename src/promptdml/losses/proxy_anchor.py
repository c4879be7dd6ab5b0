"""Proxy Anchor loss (Kim et al., CVPR 2020) on cosine similarity."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ProxyAnchorLoss(nn.Module):
    """``loss(embeddings, labels, proxies, proxy_classes=None)``.

    Positive term: for each proxy with at least one positive in the batch,
    ``log(1 + sum_{x in X_p+} exp(-alpha (s(x, p) - delta)))``; negative term: for every proxy,
    ``log(1 + sum_{x in X_p-} exp(alpha (s(x, p) + delta)))``.
    ``normalization='standard'`` averages the positive term over proxies with positives and the negative
    term over all proxies; ``'authors'`` divides both by the number of proxies (the original code).
    ``proxy_classes[j]`` is the class of proxy row j (default: row j is class j).
    """

    def __init__(self, alpha: float = 32.0, delta: float = 0.1, normalization: str = "standard") -> None:
        super().__init__()
        if normalization not in ("standard", "authors"):
            raise ValueError(f"normalization must be 'standard' or 'authors', got {normalization!r}")
        self.alpha, self.delta, self.normalization = alpha, delta, normalization

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, proxies: torch.Tensor,
                proxy_classes: torch.Tensor | None = None) -> torch.Tensor:
        emb = F.normalize(embeddings.float(), dim=-1)
        prx = F.normalize(proxies.float(), dim=-1)
        sim = emb @ prx.t()  # [B, P]
        if proxy_classes is None:
            proxy_classes = torch.arange(prx.shape[0], device=labels.device)
        pos = labels[:, None] == proxy_classes[None, :]
        # log(1 + sum exp(z)) over the masked entries == softplus-free logsumexp with a zero term
        pos_logits = torch.where(pos, -self.alpha * (sim - self.delta), float("-inf"))
        neg_logits = torch.where(~pos, self.alpha * (sim + self.delta), float("-inf"))
        zero = sim.new_zeros(1, sim.shape[1])
        pos_term = torch.logsumexp(torch.cat([zero, pos_logits], dim=0), dim=0)  # [P]
        neg_term = torch.logsumexp(torch.cat([zero, neg_logits], dim=0), dim=0)
        num_proxies = prx.shape[0]
        with_pos = pos.any(dim=0)
        if self.normalization == "standard":
            pos_loss = pos_term[with_pos].sum() / with_pos.sum().clamp(min=1)
        else:
            pos_loss = pos_term.sum() / num_proxies
        return pos_loss + neg_term.sum() / num_proxies
