"""Parameter-efficient baselines (adapters, LoRA, full fine-tuning, ...), their configs and parameter counts."""

import copy
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY, tiny_config
from test_memory_bank import bare_trainer

from promptdml.config import AdapterConfig, BackboneConfig, LoRAConfig, load_config
from promptdml.models import PromptedViT, create_backbone, create_model, format_parameter_report
from promptdml.models.model import count_parameters
from promptdml.models.peft import LoRA, MergeError, ParallelAdapters

CONFIGS = Path(__file__).resolve().parent.parent / "src" / "promptdml" / "configs"
METHODS = ["linear", "bitfit", "vpt_shallow", "vpt_deep", "adapter", "lora", "full", "plain_proxies"]



def _vit(name, **kw):
    torch.manual_seed(0)
    vit = timm.create_model(name, pretrained=False, num_classes=0, img_size=32, depth=2, **kw).eval()
    for n, p in vit.named_parameters():  # non-zero biases, as in pretrained weights
        if n.endswith("bias"):
            torch.nn.init.normal_(p, std=0.02)
    return vit.requires_grad_(False)


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "vit_base_patch16_224"])
def test_zero_init_adapter_leaves_backbone_unchanged(name):
    vit = _vit(name)
    pv = PromptedViT(vit)
    x = torch.randn(2, 3, 32, 32)
    prompts = [torch.randn(3, pv.embed_dim), None]
    with torch.no_grad():
        before = pv(x, prompts)
        adapters = ParallelAdapters(vit.blocks, pv.embed_dim, AdapterConfig(bottleneck=8, scale=0.5))
        after = pv(x, prompts)
    assert (after - before).abs().max() < 1e-5
    assert vit.blocks[0].attn.qkv.bias is not None  # the pretrained qkv bias is kept (attention untouched)
    # with a non-zero up-projection the block computes x' + mlp(norm2(x')) + s * up(relu(down(x')))
    with torch.no_grad():
        for a in adapters:
            a.up.weight.normal_(std=0.1)
        blk, t = vit.blocks[0], torch.randn(2, 5, pv.embed_dim)
        mid = t + blk.ls1(blk.attn(blk.norm1(t)))
        want = mid + blk.ls2(blk.mlp(blk.norm2(mid))) + 0.5 * adapters[0].up(torch.relu(adapters[0].down(mid)))
        torch.testing.assert_close(blk(t), want)
        assert (pv(x, prompts) - before).abs().max() > 1e-4
    with pytest.raises(MergeError, match="non-linear"):
        adapters.merge_into_backbone()


def test_lora_merged_equals_unmerged():
    vit = _vit("vit_small_patch16_224")
    pv = PromptedViT(vit)
    lora = LoRA(vit.blocks, LoRAConfig(rank=4, alpha=8.0))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = pv(x)
        assert torch.equal(plain, pv(x))  # B = 0: no change
        for layer in lora:
            layer.B.normal_(std=0.05)
        qkv, t = vit.blocks[0].attn.qkv, torch.randn(2, 5, pv.embed_dim)
        layer = lora[0]
        torch.testing.assert_close(qkv(t), t @ qkv.weight.T + qkv.bias + 2.0 * (t @ layer.A.T @ layer.B.T))
        unmerged = pv(x)
        assert (unmerged - plain).abs().max() > 1e-4
        lora.merge_into_backbone()
        assert lora.merged
        merged = pv(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def vit_s224():
    """One randomly initialised ViT-S/16 at 224 px (12 blocks), copied for every model built from it."""
    torch.manual_seed(0)
    return create_backbone(BackboneConfig(name="vit_small_patch16_224.augreg_in21k", pretrained=False))


def _count_model(path, num_classes, vit):
    cfg = load_config(path, {"model.backbone.pretrained": False})
    assert cfg.model.backbone.name == "vit_small_patch16_224.augreg_in21k" and cfg.model.backbone.img_size == 224
    return create_model(cfg.model, num_classes, backbone=copy.deepcopy(vit))


# ViT-S/16 at 224 px: every bias of the backbone, written out
D = 384
VIT_S_BIASES = D + 12 * (D + 3 * D + D + D + 4 * D + D) + D  # patch_embed; per block norm1, qkv, proj, norm2,
#                                                             fc1, fc2; final norm
HEADS = 2 * (2 * D + D * D + D)  # embedding head + isolated proxy head: LayerNorm + Linear
GRU = D * 3 * D * 2 + 3 * D  # x_proj (with bias) + h_proj (no bias)


def test_parameter_count_cub200_small(vit_s224):
    model = _count_model(CONFIGS / "cub200_small.yaml", 100, vit_s224)
    c = count_parameters(model)
    assert VIT_S_BIASES == 51_456
    expected = {"shared_prompts": 12 * 10 * D, "class_prompts": 100 * 12 * 3 * D, "bitfit": VIT_S_BIASES,
                "embed_head": HEADS // 2, "proxy_head": HEADS // 2, "container_gru": GRU, "proxy_bias": 100 * D}
    assert {g: c[g] for g in expected} == expected
    assert c["trainable"] == 12 * 10 * D + 100 * 12 * 3 * D + VIT_S_BIASES + HEADS + GRU + 100 * D == 2_701_440
    report = format_parameter_report(model)
    assert f"trainable params: {c['trainable']:,} || all params: {c['all']:,} || trainable%: " in report


def test_parameter_count_cars_small_with_steps(vit_s224):
    model = _count_model(CONFIGS / "cars_small.yaml", 98, vit_s224)
    shared = sum(80 - 2 * i for i in range(11)) * D  # 80/11/2: 80, 78, ..., 60
    cls = 98 * sum(50 - 2 * i for i in range(8)) * D  # 50/8/2: 50, 48, ..., 36
    assert shared == 770 * D and cls == 98 * 344 * D
    assert count_parameters(model)["trainable"] == shared + cls + VIT_S_BIASES + HEADS + GRU + 98 * D


def test_parameter_counts_of_baselines(vit_s224):
    vit_s_all = sum(p.numel() for p in vit_s224.parameters())
    head, proxies = HEADS // 2, 100 * D
    expected = {
        "linear": head + proxies,
        "bitfit": VIT_S_BIASES + head + proxies,
        "vpt_shallow": 10 * D + head + proxies,
        "vpt_deep": 12 * 10 * D + head + proxies,
        "adapter": 12 * (D * 64 + 64 + 64 * D + D) + head + proxies,
        "lora": 12 * (8 * D + 3 * D * 8) + head + proxies,
        "full": vit_s_all + head + proxies,
        "plain_proxies": 12 * 10 * D + VIT_S_BIASES + head + proxies,
    }
    for method, want in expected.items():
        model = _count_model(CONFIGS / f"cub200_small_{method}.yaml", 100, vit_s224)
        assert count_parameters(model)["trainable"] == want, method
        report = format_parameter_report(model)
        group = {"adapter": "adapter", "lora": "lora", "full": "backbone_full"}.get(method)
        if group:
            assert group in report, report
        assert f"trainable params: {want:,} || all params: " in report


@pytest.mark.parametrize("prefix", ["demo", "cub200_small"])
@pytest.mark.parametrize("method", METHODS)
def test_baseline_config_builds_and_trains_one_step(tiny_weights, prefix, method):
    path = CONFIGS / f"{prefix}_{method}.yaml"
    cfg = load_config(path, {"model.backbone.name": TINY["name"], "model.backbone.img_size": TINY["img_size"],
                             "model.backbone.depth": TINY["depth"], "model.backbone.weights": tiny_weights,
                             "model.embed_dim": 16, "train.precision": "fp32", "train.device": "cpu",
                             "model.adapter.bottleneck": 0 if method != "adapter" else 8,
                             "model.lora.rank": 0 if method != "lora" else 2})
    torch.manual_seed(0)
    model = create_model(cfg.model, 6).train()
    groups = set(model.trainable_groups())
    want = {"linear": set(), "bitfit": {"bitfit"}, "vpt_shallow": {"shared_prompts"},
            "vpt_deep": {"shared_prompts"}, "adapter": {"adapter"}, "lora": {"lora"}, "full": {"backbone_full"},
            "plain_proxies": {"shared_prompts", "bitfit"}}[method]
    assert groups == want | {"embed_head", "proxy_bias"}, groups
    if method == "vpt_shallow":
        assert model.shared_prompts.counts == [10, 0]
    before = {k: v.clone() for k, v in model.trainable_state().items()}
    trainer = bare_trainer(cfg, model)
    labels = torch.tensor([0, 0, 4, 4, 2, 2])
    loss = trainer.train_step(torch.randn(6, 3, 32, 32), labels)
    assert loss == loss and loss > 0
    after = model.trainable_state()
    assert set(after) == set(before)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert "embed_head.fc.weight" in changed and "proxies.bias" in changed
    group_of = {n: g for g, ps in model.trainable_groups().items() for n, _ in ps}
    assert {group_of[k] for k in changed} >= want - {"adapter", "lora"} | {"embed_head"}
    assert model.backbone.vit.training is False
    # the checkpoint state holds the new modules and reloads into a fresh model
    fresh = create_model(cfg.model, 6).eval()
    fresh.load_trainable_state(after)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_adapter_and_lora_in_trainable_state_and_gradients(tiny_weights):
    cfg = tiny_config(tiny_weights, **{"model.adapter.bottleneck": 4, "model.lora.rank": 2,
                                       "model.bitfit": False, "model.proxy.semantic": False})
    model = create_model(cfg.model, 5).train()
    with torch.no_grad():  # make the zero-initialised halves non-zero so every LoRA/adapter weight gets a gradient
        for a in model.adapters:
            a.up.weight.normal_(std=0.1)
        for layer in model.lora:
            layer.B.normal_(std=0.1)
    state = model.trainable_state()
    assert any(k.startswith("adapters.0.down") for k in state) and any(k.startswith("lora.1.A") for k in state)
    assert not any(k.startswith("backbone.") for k in state)  # nothing of the frozen backbone is stored
    labels = torch.tensor([0, 0, 3, 3])
    out = model.forward_train(torch.randn(4, 3, 32, 32), labels, 2)
    from promptdml.losses import ProxyAnchorLoss
    ProxyAnchorLoss()(out.embeddings, labels, out.proxy.proxies).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert set(model.trainable_groups()) == {"adapter", "lora", "shared_prompts", "embed_head", "proxy_bias"}
    with pytest.raises(MergeError):
        model.merge_into_backbone()


def test_model_merge_lora_and_full_finetune(tiny_weights):
    cfg = tiny_config(tiny_weights, **{"model.lora.rank": 2})
    model = create_model(cfg.model, 5).eval()
    with torch.no_grad():
        for layer in model.lora:
            layer.B.normal_(std=0.1)
        x = torch.randn(2, 3, 32, 32)
        before = model(x)
        assert model.merge_into_backbone() == TINY["depth"]
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    full = create_model(tiny_config(tiny_weights, **{"model.full_finetune": True}).model, 5)
    names = {n for n, _ in full.trainable_groups()["backbone_full"]}
    assert names == {"backbone." + n for n, _ in full.backbone.named_parameters()}
    assert "bitfit" not in full.trainable_groups()
    with pytest.raises(Exception, match="full_finetune"):
        tiny_config(tiny_weights, **{"model.full_finetune": True, "model.lora.rank": 2})


def test_adapters_and_lora_under_gradient_checkpointing(tiny_weights):
    grads = []
    for ckpt in (False, True):
        cfg = tiny_config(tiny_weights, **{"model.adapter.bottleneck": 4, "model.lora.rank": 2,
                                           "model.backbone.grad_checkpointing": ckpt})
        torch.manual_seed(0)
        model = create_model(cfg.model, 5).train()
        with torch.no_grad():
            for a, layer in zip(model.adapters, model.lora, strict=True):
                a.up.weight.normal_(std=0.1)
                layer.B.normal_(std=0.1)
        torch.manual_seed(1)
        labels = torch.tensor([0, 0, 3, 3])
        out = model.forward_train(torch.randn(4, 3, 32, 32), labels, 2)
        from promptdml.losses import ProxyAnchorLoss
        ProxyAnchorLoss()(out.embeddings, labels, out.proxy.proxies).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)
