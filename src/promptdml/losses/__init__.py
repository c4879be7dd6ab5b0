from promptdml.losses.norm_softmax import NormSoftmaxLoss
from promptdml.losses.proxy_anchor import ProxyAnchorLoss

__all__ = ["NormSoftmaxLoss", "ProxyAnchorLoss", "build_loss"]


def build_loss(cfg):
    """The loss named by ``cfg.name`` (a :class:`~promptdml.config.LossConfig`)."""
    if cfg.name == "norm_softmax":
        return NormSoftmaxLoss(cfg.temperature)
    return ProxyAnchorLoss(cfg.alpha, cfg.delta, cfg.normalization)
