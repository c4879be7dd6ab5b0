from promptdml.losses.proxy_anchor import ProxyAnchorLoss

__all__ = ["ProxyAnchorLoss"]
