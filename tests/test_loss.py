import math

import pytest
import torch
import torch.nn.functional as F

from promptdml.losses import ProxyAnchorLoss


def brute_force_proxy_anchor(emb, labels, proxies, proxy_classes, alpha, delta, normalization):
    emb = F.normalize(emb.double(), dim=-1)
    prx = F.normalize(proxies.double(), dim=-1)
    pos_sum, neg_sum, n_with_pos = 0.0, 0.0, 0
    for j in range(prx.shape[0]):
        s_pos, s_neg, has_pos = 0.0, 0.0, False
        for i in range(emb.shape[0]):
            s = float(emb[i] @ prx[j])
            if int(labels[i]) == int(proxy_classes[j]):
                s_pos += math.exp(-alpha * (s - delta))
                has_pos = True
            else:
                s_neg += math.exp(alpha * (s + delta))
        if has_pos:
            pos_sum += math.log(1 + s_pos)
            n_with_pos += 1
        neg_sum += math.log(1 + s_neg)
    p = prx.shape[0]
    if normalization == "standard":
        return pos_sum / n_with_pos + neg_sum / p
    return pos_sum / p + neg_sum / p


@pytest.mark.parametrize("normalization", ["standard", "authors"])
@pytest.mark.parametrize("proxy_range", ["both_all", "in_batch"])
def test_proxy_anchor_matches_brute_force(normalization, proxy_range):
    g = torch.Generator().manual_seed(0)
    num_classes, k = 10, 2
    batch_classes = torch.tensor([7, 2, 5, 0])
    labels = batch_classes.repeat_interleave(k)
    emb = torch.randn(labels.numel(), 8, generator=g)
    all_proxies = torch.randn(num_classes, 8, generator=g)
    if proxy_range == "both_all":
        proxies, proxy_classes = all_proxies, torch.arange(num_classes)
    else:
        proxies, proxy_classes = all_proxies[batch_classes], batch_classes
    loss_fn = ProxyAnchorLoss(alpha=32, delta=0.1, normalization=normalization)
    got = loss_fn(emb, labels, proxies, None if proxy_range == "both_all" else proxy_classes)
    want = brute_force_proxy_anchor(emb, labels, proxies, proxy_classes, 32, 0.1, normalization)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_proxy_anchor_gradients_and_extremes():
    emb = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    proxies = torch.randn(5, 4, requires_grad=True)
    loss = ProxyAnchorLoss()(emb, labels, proxies)
    loss.backward()
    assert torch.isfinite(loss) and emb.grad.abs().sum() > 0 and proxies.grad.abs().sum() > 0
    # perfectly separated embeddings at their own proxies give a much lower loss than random ones
    eye = torch.eye(4)
    perfect = ProxyAnchorLoss()(eye[labels], labels, eye[:3])
    assert perfect.item() < loss.item()
    with pytest.raises(ValueError):
        ProxyAnchorLoss(normalization="nope")
