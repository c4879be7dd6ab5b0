"""The fused two-branch backbone call (``PromptedViT.forward_branches``, ``model.backbone.fused_branches``) and
``train.compile``: equal to the separate eager passes, forward and gradients, and a fallback where the
compiler is missing."""

from __future__ import annotations

import logging

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import tiny_config
from timm.models.vision_transformer import VisionTransformer

from promptdml.engine.device import autocast
from promptdml.models import create_model
from promptdml.models.backbone import PromptedViT
from promptdml.models.peft import LoRA, ParallelAdapters


def _vit(reg_tokens: int = 0, init_values: float | None = None, depth: int = 3) -> VisionTransformer:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=depth, num_heads=4, num_classes=0,
                            reg_tokens=reg_tokens, no_embed_class=reg_tokens > 0, init_values=init_values)
    vit.requires_grad_(False)
    for name, p in vit.named_parameters():  # BitFit, with non-zero biases so their gradients are generic
        if name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.05)
            p.requires_grad_(True)
    return vit.eval()


def _prompts(counts: list[int | None], batch: int | None, dim: int = 48) -> list[torch.Tensor | None]:
    """Per-block prompts: shared ``[n, D]`` (batch None) or per-sample ``[B, n, D]``; None = no prompts."""
    return [None if n is None else torch.randn(*((n, dim) if batch is None else (batch, n, dim)),
                                               requires_grad=True) for n in counts]


def _run(model: PromptedViT, images, prompt_sets, fused: bool, dtype=None):
    """Outputs of all branches and the gradients of every trainable tensor, for a loss that weights
    every output coordinate differently."""
    leaves = [p for p in model.parameters() if p.requires_grad]
    leaves += [p for ps in prompt_sets for p in ps if p is not None]
    for t in leaves:
        t.grad = None
    with autocast(images.device, dtype):
        outs = model.forward_branches(images, prompt_sets) if fused else [model(images, p) for p in prompt_sets]
    w = torch.linspace(-1, 1, outs[0].numel()).view_as(outs[0])
    loss = sum((o.float() * w * (j + 1)).sum() + o.float().square().sum() if o.dtype != torch.float64 else
               (o * w.double() * (j + 1)).sum() + o.square().sum() for j, o in enumerate(outs))
    loss.backward()
    return [o.detach() for o in outs], [t.grad.clone() if t.grad is not None else None for t in leaves]


def _assert_close(a: list, b: list, rel: float) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x is None) == (y is None)
        if x is None:
            continue
        x, y = x.double(), y.double()
        scale = y.abs().max().clamp_min(1e-12)
        assert ((x - y).abs().max() / scale).item() <= rel, ((x - y).abs().max() / scale).item()


CASES = {
    # shared prompts / class prompts per block (None = none in that block)
    "default": ([4, 4, 4], [2, 2, 2]),
    "different depths": ([4, 4, None], [2, None, None]),
    "proxy branch without prompts": ([3, 3, 3], [None, None, None]),
    "decreasing counts": ([5, 3, 1], [3, 2, 1]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("pool", ["cls", "avg", "cls+avg"])
def test_forward_branches_equals_two_passes_fp32(case, pool):
    model = PromptedViT(_vit(), pool=pool)
    assert model.fusable() is None
    torch.manual_seed(1)
    images = torch.randn(4, 3, 32, 32)
    shared, per_class = CASES[case]
    sets = [_prompts(shared, None), _prompts(per_class, 4)]
    ref, fused = _run(model, images, sets, False), _run(model, images, sets, True)
    _assert_close(fused[0], ref[0], 1e-5)
    _assert_close(fused[1], ref[1], 1e-5)


@pytest.mark.parametrize("pool", ["cls", "avg"])
def test_forward_branches_is_exact_in_fp64(pool):
    """The fused computation is the same mathematics: in float64 it agrees with two passes to ~1e-15."""
    vit = _vit(reg_tokens=2, init_values=0.5).double()
    model = PromptedViT(vit, pool=pool)
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    sets = [[None if p is None else p.detach().double().requires_grad_() for p in ps]
            for ps in (_prompts([4, 4, None], None), _prompts([2, None, 1], 4))]
    ref, fused = _run(model, images, sets, False), _run(model, images, sets, True)
    _assert_close(fused[0], ref[0], 1e-12)
    _assert_close([g for g in fused[1]], [g for g in ref[1]], 1e-12)


def test_forward_branches_registers_layerscale_and_three_branches():
    model = PromptedViT(_vit(reg_tokens=2, init_values=0.5), pool="cls")
    assert model.num_prefix_tokens == 3
    torch.manual_seed(2)
    images = torch.randn(3, 3, 32, 32)
    sets = [_prompts([2, 2, 2], None), _prompts([1, 1, 1], 3), _prompts([None, 3, None], 3)]
    ref, fused = _run(model, images, sets, False), _run(model, images, sets, True)
    _assert_close(fused[0], ref[0], 1e-5)
    _assert_close(fused[1], ref[1], 1e-5)


@pytest.mark.parametrize("case", ["default", "different depths"])
def test_forward_branches_equals_two_passes_bf16(case):
    model = PromptedViT(_vit(), pool="cls")
    torch.manual_seed(3)
    images = torch.randn(4, 3, 32, 32)
    shared, per_class = CASES[case]
    sets = [_prompts(shared, None), _prompts(per_class, 4)]
    ref32 = _run(model, images, sets, False)
    ref, fused = _run(model, images, sets, False, torch.bfloat16), _run(model, images, sets, True, torch.bfloat16)
    # bf16 rounds differently on the two paths; both stay as close to each other as to fp32
    pairs = zip(ref[0] + [g for g in ref[1] if g is not None], ref32[0] + [g for g in ref32[1] if g is not None],
                strict=True)
    err = max(((x - y).abs().max() / y.abs().max()).item() for x, y in pairs)
    _assert_close(fused[0], ref[0], max(2 * err, 2e-2))
    _assert_close(fused[1], ref[1], max(2 * err, 2e-2))


def test_forward_branches_with_lora_adapters_and_checkpointing():
    from promptdml.config import AdapterConfig, LoRAConfig

    vit = _vit()
    lora = LoRA(vit.blocks, LoRAConfig(rank=2, alpha=4.0))
    adapters = ParallelAdapters(vit.blocks, 48, AdapterConfig(bottleneck=4, scale=0.5))
    torch.manual_seed(4)
    for p in list(lora.parameters()) + list(adapters.parameters()):  # non-zero: both change the output
        torch.nn.init.normal_(p, std=0.1)
    images = torch.randn(2, 3, 32, 32)
    sets = [_prompts([3, 3, 3], None), _prompts([2, 2, 2], 2)]
    extra = list(lora.parameters()) + list(adapters.parameters())

    def run(model, fused):
        for p in extra:
            p.grad = None
        outs, grads = _run(model, images, sets, fused)
        return outs, grads + [p.grad.clone() for p in extra]

    plain = PromptedViT(vit, pool="cls")
    ref = run(plain, False)
    assert all(g is not None and g.abs().sum() > 0 for g in ref[1][-len(extra):])
    for ckpt in (False, True):
        model = PromptedViT(vit, pool="cls", grad_checkpointing=ckpt)
        out = run(model, True)
        _assert_close(out[0], ref[0], 1e-5)
        _assert_close(out[1], ref[1], 1e-5)


def test_unfusable_blocks_fall_back_to_separate_passes():
    vit = _vit()
    model = PromptedViT(vit)
    vit.blocks[1].register_forward_hook(lambda m, a, k, out: out, with_kwargs=True)
    assert "keyword" in model.fusable()
    images = torch.randn(2, 3, 32, 32)
    sets = [_prompts([2, 2, 2], None), _prompts([1, 1, 1], 2)]
    ref, fused = _run(model, images, sets, False), _run(model, images, sets, True)
    _assert_close(fused[0], ref[0], 0.0)


# -------------------------------------------------------------------------------------------------
# The model and the training step


def _train(cfg, steps: int = 3):
    torch.manual_seed(0)
    model = create_model(cfg.model, 6)
    from promptdml.engine.optim import build_optimizers

    opts = build_optimizers(model, cfg)  # dense, proxy bias and the class-prompt rows (LazyRowOptimizer)
    from promptdml.losses import build_loss

    loss_fn = build_loss(cfg.loss)
    g = torch.Generator().manual_seed(5)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[cfg.train.precision]
    for step in range(steps):
        images = torch.randn(8, 3, 32, 32, generator=g)
        labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]) + (step % 3)
        with autocast(torch.device("cpu"), dtype):
            out = model.forward_train(images, labels, 2)
        loss = loss_fn(out.embeddings, labels, out.proxy)
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()
        model.commit(out)
    return model.trainable_state()


def _global_rel(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all tensors of two trainable states together."""
    x = torch.cat([a[n].double().flatten() for n in b])
    y = torch.cat([b[n].double().flatten() for n in b])
    return ((x - y).norm() / y.norm()).item()


def test_training_steps_give_equal_weights_fp32(tiny_weights):
    """3 optimisation steps of forward_train, fused vs two passes, fp32: every tensor but the proxy bias agrees
    to 1e-6, relative to its largest value where that exceeds 1, the proxy bias to 4e-6, and all weights
    together to 1e-6 relative. (The proxy bias, trained with lr_proxy 0.1 on a loss with scale alpha 32, differs
    by 2.2e-6 at magnitude 1.07 after 3 steps, about 19 units in the last place: last-bit rounding differences
    amplified; every other tensor by at most 5e-7. In fp64 the two computations agree to 1e-15,
    test_forward_branches_is_exact_in_fp64.)"""
    over = {"train.precision": "fp32", "model.prompts.num_p_prompt": 1}  # different prompt counts (3 vs 1)
    ref = _train(tiny_config(tiny_weights, **over, **{"model.backbone.fused_branches": False}))
    fused = _train(tiny_config(tiny_weights, **over, **{"model.backbone.fused_branches": True}))
    assert ref.keys() == fused.keys() and len(ref) > 5
    for name in ref:
        diff = (fused[name] - ref[name]).abs().max().item()
        tol = 4e-6 if name == "proxies.bias" else 1e-6
        assert diff <= tol * max(ref[name].abs().max().item(), 1.0), (name, diff)
    assert _global_rel(fused, ref) <= 1e-6


def test_training_steps_give_equal_weights_bf16(tiny_weights):
    """bf16 autocast rounds each op's result to 8 significant bits, so two exact computations that round in a
    different order differ by bf16 noise: after 3 steps the fused weights agree with the two-pass ones to 1e-3
    relative (all weights together), and are no further from the fp32 two-pass weights than the bf16 two-pass
    weights are."""
    over = {"model.prompts.num_p_prompt": 1}
    fp32 = _train(tiny_config(tiny_weights, **over, **{"model.backbone.fused_branches": False}))
    over["train.precision"] = "bf16"
    ref = _train(tiny_config(tiny_weights, **over, **{"model.backbone.fused_branches": False}))
    fused = _train(tiny_config(tiny_weights, **over, **{"model.backbone.fused_branches": True}))
    assert _global_rel(fused, ref) <= 1e-3
    assert _global_rel(fused, fp32) <= 1.25 * _global_rel(ref, fp32)


def test_forward_train_uses_one_backbone_call(tiny_cfg, monkeypatch):
    assert tiny_cfg.model.backbone.fused_branches is True  # the default: one call for both branches
    model = create_model(tiny_cfg.model, 4)
    calls = []
    original = PromptedViT.forward_branches
    monkeypatch.setattr(PromptedViT, "forward_branches",
                        lambda self, *a: calls.append(1) or original(self, *a))
    monkeypatch.setattr(PromptedViT, "forward", lambda self, *a: pytest.fail("separate pass"))
    model.forward_train(torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 1, 1]), 2)
    assert calls == [1]


# -------------------------------------------------------------------------------------------------
# train.compile


def test_compile_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    """No working C++ compiler (simulated): one warning line, then eager results."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/promptdml-test-c++",))
    model = PromptedViT(_vit(depth=2))
    images = torch.randn(2, 3, 32, 32)
    sets = [_prompts([2, 2], None), _prompts([1, 1], 2)]
    ref = _run(model, images, sets, True)
    assert model.enable_compile()
    with caplog.at_level(logging.WARNING, logger="promptdml"):
        out = _run(model, images, sets, True)
        again = _run(model, images, sets, True)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "training continues eager" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    assert not model.compiled
    _assert_close(out[0], ref[0], 0.0)
    _assert_close(again[1], ref[1], 0.0)
    torch._dynamo.reset()


def test_compile_unavailable_at_enable(monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", broken)
    model = PromptedViT(_vit(depth=1))
    with caplog.at_level(logging.WARNING, logger="promptdml"):
        assert not model.enable_compile()
    assert "training continues eager" in caplog.text and not model.compiled


def test_sdpa_fp32_backward_forward_is_torchs_and_gradients_are_exact():
    """The fused blocks' attention: forward bit-equal to torch's kernel; backward = the analytic gradient
    (gradcheck in fp64); in bf16 its gradients are no further from the fp64 ones than torch's kernel's."""
    from promptdml.models.backbone import _attention, _SdpaFp32Backward

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    k2, v2 = k[:, :, :4].detach().requires_grad_(), v[:, :, :4].detach().requires_grad_()  # fewer keys
    assert torch.autograd.gradcheck(_SdpaFp32Backward.apply, (q, k2, v2))
    qb, kb, vb = (torch.randn(4, 6, 47, 64).bfloat16().requires_grad_() for _ in range(3))
    g = torch.randn(4, 6, 47, 64).bfloat16()
    out = _attention(qb, kb, vb)
    assert out.grad_fn is not None and type(out.grad_fn).__name__.startswith("_SdpaFp32Backward")
    assert torch.equal(out, F.scaled_dot_product_attention(qb, kb, vb))
    ours = torch.autograd.grad(out, (qb, kb, vb), g)
    torchs = torch.autograd.grad(F.scaled_dot_product_attention(qb, kb, vb), (qb, kb, vb), g)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (qb, kb, vb))
    exact = torch.autograd.grad(F.scaled_dot_product_attention(qd, kd, vd), (qd, kd, vd), g.double())
    for a, b, e in zip(ours, torchs, exact, strict=True):
        err_ours = ((a.double() - e).norm() / e.norm()).item()
        err_torch = ((b.double() - e).norm() / e.norm()).item()
        assert err_ours <= 2e-3 and err_ours <= err_torch, (err_ours, err_torch)
    with torch.no_grad():  # evaluation and fp32 keep torch's kernel
        assert _attention(qb, kb, vb).grad_fn is None
    assert _attention(qb.float(), kb.float(), vb.float()).grad_fn.name() != "_SdpaFp32BackwardBackward"


def test_corrupt_compiler_cache_falls_back_with_a_fix(monkeypatch, caplog, tmp_path):
    """A half-written kernel in the inductor cache (ImportError at the first call) falls back to eager and
    names the cache folder to delete."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    model = PromptedViT(_vit(depth=1))
    assert model.enable_compile()

    def corrupt(*a, **k):
        from torch._inductor.exc import InductorError

        raise InductorError(ImportError("/x/main.so: file too short"), None)

    model._compiled = {"plain": corrupt, "fused": corrupt}
    images = torch.randn(2, 3, 32, 32)
    with caplog.at_level(logging.WARNING, logger="promptdml"):
        out = model(images, _prompts([1], None))
    assert out.shape[0] == 2 and not model.compiled
    assert "training continues eager" in caplog.text and str(tmp_path / "cache") in caplog.text


def test_trainer_compile_option_enables_compile(tiny_weights, monkeypatch):
    from promptdml.engine import Trainer

    seen = []
    monkeypatch.setattr(PromptedViT, "enable_compile", lambda self: seen.append(self) or True)
    cfg = tiny_config(tiny_weights, **{"data.dataset": "demo", "data.demo_classes": 4,
                                       "data.demo_images_per_class": 4, "data.batch_size": 4,
                                       "train.compile": True, "train.tensorboard": False})
    Trainer(cfg, echo=lambda s: None, dry=True)
    assert len(seen) == 1


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True])
def test_compiled_equals_eager(fused, tmp_path, monkeypatch):
    """Compiled (inductor) forward and gradients equal the eager ones; no graph breaks in the blocks."""
    import torch._inductor.config as inductor_config

    # A private compiler cache, built in this process: a cache shared with other runs (or written by the
    # subprocess compile pool) can hold a half-written .so ("file too short"), which is not what this tests.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(inductor_config, "compile_threads", 1)
    torch._dynamo.reset()
    model = PromptedViT(_vit(depth=3), pool="cls")
    images = torch.randn(2, 3, 32, 32)
    sets = [_prompts([2, 2, 2], None), _prompts([1, 1, None], 2)]
    ref = _run(model, images, sets, fused)
    assert model.enable_compile()
    out = _run(model, images, sets, fused)
    out = _run(model, images, sets, fused)
    assert model.compiled and model.compile_seconds > 0
    _assert_close(out[0], ref[0], 1e-5)
    _assert_close(out[1], ref[1], 1e-5)
    explain = torch._dynamo.explain(model._compiled["fused" if fused else "plain"]._torchdynamo_orig_callable)
    if fused:
        result = explain(model.vit.blocks[0], 1, torch.randn(2, 10, 48), [5, 5], [sets[0][0], sets[1][0]], False)
    else:
        result = explain(model.vit.blocks[0], 1, torch.randn(2, 17, 48), sets[1][0])
    assert result.graph_break_count == 0
    torch._dynamo.reset()


def test_model_level_timm_names_are_fusable():
    """The shipped configs' architectures (DINOv2 with LayerScale, AugReg) run fused."""
    for name in ("vit_small_patch14_dinov2", "vit_small_patch16_224"):
        vit = timm.create_model(name, pretrained=False, num_classes=0, img_size=28, depth=1)
        assert PromptedViT(vit).fusable() is None
