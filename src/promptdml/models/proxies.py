"""Semantic proxies: a per-class container updated from class-prompted features, mixed with a bias."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from promptdml.config import ProxyConfig
from promptdml.metrics.geometry import mean_pairwise_cosine


class ProxyGRUCell(nn.Module):
    """GRU cell h' = (1 - z) * n + z * h with n = act(x Wn + r * (h Un) + bn).

    ``activation='relu'`` is the method's ``gru_relu`` variant, ``'tanh'`` the classic GRU. The hidden
    projection has no bias (the formula has none), so no parameter is unused.
    """

    def __init__(self, dim: int, activation: str = "relu") -> None:
        super().__init__()
        self.x_proj = nn.Linear(dim, 3 * dim)  # Wz, Wr, Wn with bz, br, bn
        self.h_proj = nn.Linear(dim, 3 * dim, bias=False)  # Uz, Ur, Un
        self.activation = activation
        for weight in (self.x_proj.weight, self.h_proj.weight):  # Xavier-uniform per gate matrix, zero biases
            for gate in weight.data.chunk(3, dim=0):
                nn.init.xavier_uniform_(gate)
        nn.init.zeros_(self.x_proj.bias)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        xz, xr, xn = self.x_proj(x).chunk(3, dim=-1)
        hz, hr, hn = self.h_proj(h).chunk(3, dim=-1)
        z = torch.sigmoid(xz + hz)
        r = torch.sigmoid(xr + hr)
        pre = xn + r * hn
        n = torch.relu(pre) if self.activation == "relu" else torch.tanh(pre)
        return (1 - z) * n + z * h


@dataclass
class ProxyOutput:
    proxies: torch.Tensor
    """[C, E] proxies of all classes (graph through this batch's rows and the bias)."""
    batch_proxies: torch.Tensor
    """[B/k, E] L2-normalised proxies of the batch's classes."""
    batch_classes: torch.Tensor
    """[B/k] class ids of the batch."""
    new_rows: torch.Tensor | None
    """[B/k, E] detached container rows to write after a successful step (None without container)."""


class SemanticProxies(nn.Module):
    """Proxy container ``H`` (buffer, unit rows), its update rule and the learnable proxy bias.

    ``P = lambda * P_bias + (1 - lambda) * H`` (with this batch's rows replaced by their updated, graph-
    carrying values, renormalised like every row of ``H``); with ``semantic=False`` the proxies are the learnable ``P_bias`` alone.
    """

    def __init__(self, num_classes: int, dim: int, cfg: ProxyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.semantic = cfg.semantic
        self.ratio = cfg.proxy_bias_ratio if cfg.semantic else 1.0
        bias = torch.empty(num_classes, dim)
        if cfg.bias_init == "kaiming":
            nn.init.kaiming_normal_(bias, mode="fan_out")
        else:
            bias.normal_(0.0, cfg.bias_init_std)
        self.bias = nn.Parameter(bias)
        if cfg.semantic:
            self.register_buffer("container", F.normalize(torch.randn(num_classes, dim), dim=-1))
            self.gru = (ProxyGRUCell(dim, "relu" if cfg.container_update == "gru_relu" else "tanh")
                        if cfg.container_update in ("gru_relu", "gru") else None)
            self.dropout = nn.Dropout(cfg.rnn_dropout)
        else:
            self.container = None
            self.gru = None

    @property
    def num_classes(self) -> int:
        return self.bias.shape[0]

    def update_rows(self, q: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """New container rows for ``classes`` from class-prompted features ``q`` [B/k, k, E]."""
        h = self.container.index_select(0, classes).to(q.dtype)
        if self.gru is None:  # mix
            keep = self.cfg.mix_keep_ratio
            return keep * h + (1 - keep) * q.mean(dim=1)
        for j in range(q.shape[1]):
            h = self.dropout(self.gru(q[:, j], h))
        return h

    def forward(self, classes: torch.Tensor, q: torch.Tensor | None) -> ProxyOutput:
        if not self.semantic:
            return self.assemble(classes, None)
        return self.assemble(classes, self.update_rows(q, classes))

    def assemble(self, classes: torch.Tensor, h: torch.Tensor | None) -> ProxyOutput:
        """Proxies from the updated rows ``h`` of ``classes`` (distributed training calls this with all ranks'
        classes and rows; ``h`` is None without the container)."""
        lam = self.ratio
        if not self.semantic:
            return ProxyOutput(self.bias, F.normalize(self.bias.index_select(0, classes), dim=-1), classes, None)
        # the container holds unit rows: this step's rows enter the proxies renormalised (with their graph), so the
        # shared generator cannot grow one class-independent vector until it dominates every proxy
        container = self.container.to(h.dtype).index_put((classes,), F.normalize(h, dim=-1))
        proxies = lam * self.bias + (1 - lam) * container
        batch = F.normalize(lam * self.bias.index_select(0, classes) + (1 - lam) * h, dim=-1)
        return ProxyOutput(proxies, batch, classes, h.detach())

    @torch.no_grad()
    def geometry(self, max_rows: int = 2048) -> dict[str, float]:
        """Mean pairwise cosine between the current proxies (``proxy_cos``) and, with the container, between its
        rows (``container_cos``), over at most ``max_rows`` evenly spaced classes.

        Healthy proxies are spread out (values near 0). Values near 1 mean a collapse: every class's proxy
        points the same way, so the loss can be lowered by moving all proxies away from all embeddings at once
        instead of separating classes (see docs/method.md, "proxy collapse")."""
        idx = torch.linspace(0, self.num_classes - 1, min(self.num_classes, max_rows)).round().long()
        idx = idx.to(self.bias.device)

        bias = self.bias.index_select(0, idx)
        if not self.semantic:
            return {"proxy_cos": mean_pairwise_cosine(bias)}
        rows = self.container.index_select(0, idx)
        return {"proxy_cos": mean_pairwise_cosine(self.ratio * bias + (1 - self.ratio) * rows),
                "container_cos": mean_pairwise_cosine(rows)}

    @torch.no_grad()
    def init_from_class_means(self, embedding_means: torch.Tensor | None, branch_means: torch.Tensor | None) -> None:
        """Start every proxy at its class: ``P_bias`` rows from the classes' mean embeddings and the container
        rows from their mean proxy-branch features (``[C, E]`` each, None = keep that part's init); rows are
        L2-normalised."""
        if embedding_means is not None:
            self.bias.copy_(F.normalize(embedding_means.float(), dim=-1).to(self.bias))
        if branch_means is not None and self.container is not None:
            self.container.copy_(F.normalize(branch_means.float(), dim=-1).to(self.container))

    @torch.no_grad()
    def write_rows(self, classes: torch.Tensor, rows: torch.Tensor) -> None:
        """Store updated rows (renormalised); called after a successful optimiser step."""
        self.container.index_copy_(0, classes, F.normalize(rows.float(), dim=-1).to(self.container.dtype))
