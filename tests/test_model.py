import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import tiny_config

from promptdml.config import BackboneConfig, ProxyConfig
from promptdml.losses import ProxyAnchorLoss
from promptdml.models import BackboneError, PromptedViT, create_backbone, create_model
from promptdml.models.prompts import prompt_counts
from promptdml.models.proxies import ProxyGRUCell, SemanticProxies


def test_prompt_counts():
    assert prompt_counts(5, 4, 5, 12)[:5] == [5, 0, 0, 0, 0]
    assert prompt_counts(80, 11, 2, 12) == [80, 78, 76, 74, 72, 70, 68, 66, 64, 62, 60, 0]
    assert prompt_counts(10, 12, 0, 12) == [10] * 12


def test_gru_tanh_equals_torch_grucell():
    torch.manual_seed(0)
    cell = ProxyGRUCell(6, activation="tanh")
    ref = torch.nn.GRUCell(6, 6)
    wz, wr, wn = cell.x_proj.weight.detach().chunk(3)
    bz, br, bn = cell.x_proj.bias.detach().chunk(3)
    uz, ur, un = cell.h_proj.weight.detach().chunk(3)
    with torch.no_grad():  # torch orders gates r, z, n; its hidden bias is zero here
        ref.weight_ih.copy_(torch.cat([wr, wz, wn]))
        ref.bias_ih.copy_(torch.cat([br, bz, bn]))
        ref.weight_hh.copy_(torch.cat([ur, uz, un]))
        ref.bias_hh.zero_()
    x, h = torch.randn(5, 6), torch.randn(5, 6)
    torch.testing.assert_close(cell(x, h), ref(x, h))


def test_gru_relu_matches_formula():
    torch.manual_seed(1)
    cell = ProxyGRUCell(4, activation="relu")
    x, h = torch.randn(3, 4), torch.randn(3, 4)
    W, b, U = cell.x_proj.weight.detach(), cell.x_proj.bias.detach(), cell.h_proj.weight.detach()
    Wz, Wr, Wn = W[:4], W[4:8], W[8:]
    bz, br, bn = b[:4], b[4:8], b[8:]
    Uz, Ur, Un = U[:4], U[4:8], U[8:]
    z = torch.sigmoid(x @ Wz.T + h @ Uz.T + bz)
    r = torch.sigmoid(x @ Wr.T + h @ Ur.T + br)
    n = torch.relu(x @ Wn.T + r * (h @ Un.T) + bn)
    torch.testing.assert_close(cell(x, h), (1 - z) * n + z * h)


@pytest.mark.parametrize("update", ["gru_relu", "gru", "mix"])
def test_container_update_and_mixing(update):
    torch.manual_seed(2)
    lam = 0.3
    sp = SemanticProxies(6, 4, ProxyConfig(container_update=update, proxy_bias_ratio=lam, mix_keep_ratio=0.8))
    H0 = sp.container.clone()
    classes = torch.tensor([4, 1])
    q = F.normalize(torch.randn(2, 3, 4), dim=-1)  # k = 3
    out = sp(classes, q)
    if update == "mix":
        h = 0.8 * H0[classes] + 0.2 * q.mean(1)
    else:
        h = H0[classes]
        for j in range(3):
            h = sp.gru(q[:, j], h)
    torch.testing.assert_close(out.new_rows, h.detach())
    H_graph = H0.clone()
    H_graph[classes] = h / h.norm(dim=-1, keepdim=True)  # the container's rows are unit vectors, also in P
    torch.testing.assert_close(out.proxies, lam * sp.bias + (1 - lam) * H_graph)
    # P carries the graph of this step's rows: a gradient on P reaches the container update
    assert out.proxies.requires_grad and out.proxies.grad_fn is not None
    torch.testing.assert_close(out.batch_proxies, F.normalize(lam * sp.bias[classes] + (1 - lam) * h, dim=-1))
    sp.write_rows(classes, out.new_rows)
    torch.testing.assert_close(sp.container[classes], F.normalize(h.detach(), dim=-1))
    others = torch.tensor([0, 2, 3, 5])
    assert torch.equal(sp.container[others], H0[others])
    assert "container" in dict(sp.named_buffers()) and "container" not in dict(sp.named_parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_mean_pairwise_cosine_matches_pairwise_loop(dtype):
    from promptdml.metrics import mean_pairwise_cosine

    torch.manual_seed(5)
    rows = torch.randn(7, 5) * torch.rand(7, 1) * 3  # rows of different norms: cosine ignores the norm
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-6
    assert mean_pairwise_cosine(rows.to(dtype)) == pytest.approx(_mean_offdiag_cos(rows.double()), abs=tol)
    assert mean_pairwise_cosine(torch.ones(4, 3) * torch.arange(1, 5.0)[:, None]) == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.eye(6)) == pytest.approx(0.0, abs=1e-7)
    assert mean_pairwise_cosine(torch.cat([torch.eye(3), -torch.eye(3)])) == pytest.approx(-1 / 5)
    assert mean_pairwise_cosine(torch.randn(1, 4)) == 0.0


def _mean_offdiag_cos(rows):
    n, total = rows.shape[0], 0.0
    for i in range(n):
        for j in range(n):
            if i != j:
                total += float(F.cosine_similarity(rows[i], rows[j], dim=0))
    return total / (n * (n - 1))


@pytest.mark.parametrize("semantic", [True, False])
def test_proxy_geometry_against_pairwise_loop(semantic):
    torch.manual_seed(3)
    sp = SemanticProxies(5, 4, ProxyConfig(semantic=semantic, proxy_bias_ratio=0.3))
    geo = sp.geometry()
    if semantic:
        expected = 0.3 * sp.bias.detach() + 0.7 * sp.container
        assert geo["container_cos"] == pytest.approx(_mean_offdiag_cos(sp.container), abs=1e-6)
    else:
        expected = sp.bias.detach()
        assert "container_cos" not in geo
    assert geo["proxy_cos"] == pytest.approx(_mean_offdiag_cos(expected), abs=1e-6)
    # a collapsed container (every row the same direction) reads as cosine 1
    sp2 = SemanticProxies(5, 4, ProxyConfig())
    sp2.container.copy_(F.normalize(torch.ones(5, 4), dim=-1))
    assert sp2.geometry()["container_cos"] == pytest.approx(1.0, abs=1e-6)
    # subsampling picks evenly spaced classes, first and last included
    assert sp.geometry(max_rows=2)["proxy_cos"] == pytest.approx(_mean_offdiag_cos(expected[[0, 4]]), abs=1e-6)


def _tiny_vit(name="vit_tiny_patch16_224", **kw):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=0, img_size=32, depth=2, **kw).eval()


@pytest.mark.parametrize("name,prefix", [("vit_tiny_patch16_224", 1), ("vit_small_patch14_reg4_dinov2", 5),
                                         ("deit_tiny_distilled_patch16_224", 2)])
def test_prompts_inserted_after_prefix_and_removed(name, prefix):
    vit = _tiny_vit(name) if "dinov2" not in name else timm.create_model(
        name, pretrained=False, num_classes=0, img_size=28, depth=2).eval()
    size = 28 if "dinov2" in name else 32
    pv = PromptedViT(vit)
    assert pv.num_prefix_tokens == prefix
    D = pv.embed_dim
    p0, p1 = torch.randn(3, D), torch.randn(2, D)
    seen = []
    hooks = [blk.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone())) for blk in vit.blocks]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = pv(x, [p0, p1])
    for h in hooks:
        h.remove()
    num_patches = vit.patch_embed.num_patches
    assert out.shape == (2, D)
    assert seen[0].shape[1] == prefix + 3 + num_patches and seen[1].shape[1] == prefix + 2 + num_patches
    torch.testing.assert_close(seen[0][:, prefix:prefix + 3], p0.expand(2, -1, -1))
    torch.testing.assert_close(seen[1][:, prefix:prefix + 2], p1.expand(2, -1, -1))
    # hand-built 2-block forward: insert, run, drop, insert, run, drop, norm, CLS
    with torch.no_grad():
        t = pv.tokens(x)
        t = torch.cat([t[:, :prefix], p0.expand(2, -1, -1), t[:, prefix:]], 1)
        t = vit.blocks[0](t)
        t = torch.cat([t[:, :prefix], t[:, prefix + 3:]], 1)
        torch.testing.assert_close(seen[1][:, :prefix], t[:, :prefix])
        t = torch.cat([t[:, :prefix], p1.expand(2, -1, -1), t[:, prefix:]], 1)
        t = vit.blocks[1](t)
        t = torch.cat([t[:, :prefix], t[:, prefix + 2:]], 1)
        want = vit.norm(t)[:, 0]
    torch.testing.assert_close(out, want)
    # no prompts == timm's own forward
    with torch.no_grad():
        torch.testing.assert_close(pv(x), vit.forward_features(x)[:, 0])


def test_gradients_reach_exactly_trainable_parameters(tiny_cfg):
    torch.manual_seed(0)
    model = create_model(tiny_cfg.model, num_classes=8).train()
    classes = torch.tensor([5, 1, 6])
    labels = classes.repeat_interleave(2)
    images = torch.randn(6, 3, 32, 32)
    out = model.forward_train(images, labels, samples_per_class=2)
    ProxyAnchorLoss()(out.embeddings, labels, out.proxy.proxies).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
    frozen_backbone = [n for n, _ in model.backbone.named_parameters() if not n.endswith("bias")]
    assert frozen_backbone and all(("backbone." + n) not in trainable for n in frozen_backbone)
    assert all(("backbone." + n) in trainable for n, _ in model.backbone.named_parameters() if n.endswith("bias"))
    grad = model.class_prompts.table.grad
    absent = [c for c in range(8) if c not in classes.tolist()]
    assert torch.count_nonzero(grad[absent]) == 0
    assert all(grad[c].abs().sum() > 0 for c in classes.tolist())
    assert model.backbone.vit.training is False  # frozen backbone stays in eval mode


def test_plain_proxies_model_has_no_semantic_branch(tiny_weights):
    cfg = tiny_config(tiny_weights, **{"model.proxy.semantic": False})
    model = create_model(cfg.model, 5)
    groups = model.trainable_groups()
    assert "class_prompts" not in groups and "container_gru" not in groups and "proxy_head" not in groups
    out = model.forward_train(torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 3, 3]), 2)
    assert out.proxy.proxies is model.proxies.bias and out.proxy.new_rows is None


def test_unbalanced_batch_rejected(tiny_cfg):
    model = create_model(tiny_cfg.model, 5)
    with pytest.raises(ValueError, match="class-balanced"):
        model.forward_train(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]), 2)


def test_wrong_architecture_weights(tiny_weights):
    with pytest.raises(BackboneError, match="does not fit architecture"):
        create_backbone(BackboneConfig(name="vit_small_patch16_224", weights=tiny_weights, img_size=32, depth=2))
    with pytest.raises(BackboneError, match="does not exist"):
        create_backbone(BackboneConfig(name="vit_small_patch16_224", weights="/no/such/file.safetensors"))


def test_weights_folder_lookup_and_pos_embed_resampling(tiny_weights):
    folder = str(__import__("pathlib").Path(tiny_weights).parent)
    vit = create_backbone(BackboneConfig(name="vit_tiny_patch16_224", weights=folder, img_size=48, depth=2))
    assert vit.pos_embed.shape[1] == 1 + 9  # resampled from 2x2 to 3x3 patches
    assert not any(p.requires_grad for p in vit.parameters())


def test_centered_head_ignores_shared_shifts_and_tracks_a_running_mean():
    from promptdml.models.heads import EmbeddingHead

    torch.manual_seed(0)
    head = EmbeddingHead(16, 8, center=True, momentum=0.5).train()
    h = torch.randn(6, 16)
    shift = 3.0 * torch.randn(16)
    a = head.centered(h)
    torch.testing.assert_close(a, h - h.mean(0))
    torch.testing.assert_close(head.running_mean, 0.5 * h.mean(0))
    b = head.centered(h + shift)  # a shift shared by the batch is removed exactly
    torch.testing.assert_close(a, b)
    expected = 0.5 * (0.5 * h.mean(0)) + 0.5 * (h + shift).mean(0)
    torch.testing.assert_close(head.running_mean, expected)
    head.eval()
    torch.testing.assert_close(head.centered(h), h - expected)
    torch.testing.assert_close(head.running_mean, expected)  # eval does not update it
    plain = EmbeddingHead(16, 8).train()
    assert torch.equal(plain.centered(h), h) and not hasattr(plain, "running_mean")
