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


@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_norm_softmax_matches_pytorch_metric_learning(temperature):
    """Loss and gradients equal PML's NormalizedSoftmaxLoss with its weight matrix set to our proxies."""
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    from promptdml.losses import NormSoftmaxLoss

    g = torch.Generator().manual_seed(7)
    emb = torch.randn(12, 16, generator=g, dtype=torch.float64)
    proxies = torch.randn(5, 16, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (12,), generator=g)
    ours_e, ours_p = emb.clone().requires_grad_(), proxies.clone().requires_grad_()
    ours = NormSoftmaxLoss(temperature)(ours_e, labels, ours_p)
    ours.backward()

    oracle = pml_losses.NormalizedSoftmaxLoss(num_classes=5, embedding_size=16, temperature=temperature)
    oracle.W.data = proxies.t().clone()
    ref_e = emb.clone().requires_grad_()
    ref = oracle(ref_e, labels)
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)  # ours computes in float32
    torch.testing.assert_close(ours_e.grad, ref_e.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours_p.grad, oracle.W.grad.t(), rtol=1e-5, atol=1e-7)


def test_norm_softmax_proxy_classes_pick_the_labelled_rows():
    """With ``proxy_classes`` (rows in any order, a subset of classes) the target is the row of each label."""
    from promptdml.losses import NormSoftmaxLoss

    g = torch.Generator().manual_seed(3)
    emb = torch.randn(6, 8, generator=g, dtype=torch.float64)
    proxies = torch.randn(4, 8, generator=g, dtype=torch.float64)
    proxy_classes = torch.tensor([9, 2, 5, 7])
    labels = torch.tensor([2, 9, 9, 7, 5, 2])
    loss = NormSoftmaxLoss(0.1)(emb, labels, proxies, proxy_classes)
    cos = F.normalize(emb, dim=1) @ F.normalize(proxies, dim=1).t() / 0.1
    rows = [int((proxy_classes == y).nonzero()) for y in labels]
    expected = sum(torch.logsumexp(cos[i], 0) - cos[i, r] for i, r in enumerate(rows)) / len(rows)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="proxy"):
        NormSoftmaxLoss(0.1)(emb, torch.tensor([1, 2, 3, 4, 5, 6]), proxies, proxy_classes)
    # the loss's upper bound: every similarity equal -> log(number of proxies)
    same = NormSoftmaxLoss(0.1)(torch.ones(3, 8), torch.tensor([0, 1, 2]), torch.ones(4, 8))
    assert same.item() == pytest.approx(math.log(4), rel=1e-6)
