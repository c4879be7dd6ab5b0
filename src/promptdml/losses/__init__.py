"""Proxy losses, registered by name (``loss.name``) in :data:`promptdml.registry.LOSSES`.

A registered builder takes the :class:`~promptdml.config.LossConfig` and returns a callable
``loss(embeddings, labels, proxy)`` where ``proxy`` is the model's
:class:`~promptdml.models.proxies.ProxyOutput` (all classes' proxies, the batch's classes and their
proxies); :class:`ProxyLoss` adapts a loss over ``(embeddings, labels, proxies, proxy_classes)`` to it.
"""

import torch
import torch.nn as nn

from promptdml.losses.norm_softmax import NormSoftmaxLoss
from promptdml.losses.proxy_anchor import ProxyAnchorLoss
from promptdml.registry import LOSSES, register_loss

__all__ = ["NormSoftmaxLoss", "ProxyAnchorLoss", "ProxyLoss", "build_loss", "register_loss"]


class ProxyLoss(nn.Module):
    """``loss(embeddings, labels, proxy)`` from a loss over explicit proxies: every class's proxy
    (``proxy_range='both_all'``) or the batch's classes' only (``'in_batch'``)."""

    def __init__(self, loss: nn.Module, proxy_range: str = "both_all") -> None:
        super().__init__()
        if proxy_range not in ("both_all", "in_batch"):
            raise ValueError(f"proxy_range must be 'both_all' or 'in_batch', got {proxy_range!r}")
        self.loss, self.proxy_range = loss, proxy_range

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, proxy) -> torch.Tensor:
        if self.proxy_range == "both_all":
            return self.loss(embeddings, labels, proxy.proxies)
        return self.loss(embeddings, labels, proxy.batch_proxies, proxy.batch_classes)


def build_proxy_anchor(cfg) -> ProxyLoss:
    return ProxyLoss(ProxyAnchorLoss(cfg.alpha, cfg.delta, cfg.normalization), cfg.proxy_range)


def build_norm_softmax(cfg) -> ProxyLoss:
    return ProxyLoss(NormSoftmaxLoss(cfg.temperature), cfg.proxy_range)


def build_loss(cfg):
    """The loss named by ``cfg.name`` (a :class:`~promptdml.config.LossConfig`), taking the proxy output."""
    return LOSSES.get(cfg.name)(cfg)
