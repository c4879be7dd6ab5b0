"""Class-prompt sources (model.class_prompts.source): table, lowrank, generated."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from conftest import tiny_config
from test_distributed import _assert_same, _load, _overrides, launch
from test_engine import _cfg, _quiet

from promptdml.checkpoint import load_model, save_checkpoint
from promptdml.config import ClassPromptConfig, load_config
from promptdml.engine import Trainer
from promptdml.engine.state import LAST, RESUME_DIR
from promptdml.errors import ConfigError
from promptdml.losses import build_loss
from promptdml.models import create_model
from promptdml.models.class_prompt_sources import GeneratedClassPrompts, LowRankClassPrompts
from promptdml.models.model import count_parameters, format_parameter_report
from promptdml.models.prompts import ClassPrompts, _prompt_std
from promptdml.registry import CLASS_PROMPT_SOURCES

C = 6
D = 192  # the tiny ViT's width (conftest)
COUNTS = [2, 2]  # tiny_config: num_p_prompt 2 in both blocks
T = sum(COUNTS)


pytestmark = pytest.mark.usefixtures("single_process_env")


SOURCES = {"lowrank": {"model.class_prompts.source": "lowrank", "model.class_prompts.rank": 4},
           "generated": {"model.class_prompts.source": "generated", "model.class_prompts.hidden": 8},
           "generated_residual": {"model.class_prompts.source": "generated", "model.class_prompts.hidden": 8,
                                  "model.class_prompts.generated_residual": True, "model.class_prompts.rank": 3}}


def _model(tiny_weights, source: str, **extra):
    cfg = tiny_config(tiny_weights, **SOURCES[source], **extra)
    torch.manual_seed(0)
    return create_model(cfg.model, C), cfg


# ------------------------------------------------------------------------------------------- shapes, grads
@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize("fused", [True, False])
def test_shapes_and_gradients_reach_every_parameter(tiny_weights, source, fused):
    model, cfg = _model(tiny_weights, source, **{"model.backbone.fused_branches": fused})
    source_module = model.class_prompts
    assert not model.memory_bank and model.row_placements() == []
    if getattr(source_module, "residual", None) is not None:  # zero-initialised basis: no code gradient yet
        torch.nn.init.normal_(source_module.residual.basis, std=0.01)
    labels = torch.tensor([0, 0, 3, 3])
    prompts = source_module(labels)
    assert [tuple(p.shape) for p in prompts] == [(4, m, D) for m in COUNTS]
    torch.manual_seed(1)
    out = model.forward_train(torch.randn(4, 3, 32, 32), labels, samples_per_class=2)
    build_loss(cfg.loss)(out.embeddings, labels, out.proxy).backward()
    params = dict(source_module.named_parameters())
    assert params
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name in [n for n in params if n.endswith("codes")]:  # only the batch's classes' codes get a gradient
        assert params[name].grad[[1, 2, 4, 5]].abs().sum() == 0, name


def test_zero_class_prompts_give_none_per_block(tiny_weights):
    for source in SOURCES:
        model, _ = _model(tiny_weights, source, **{"model.prompts.num_p_prompt": 0})
        assert model.class_prompts(torch.tensor([0, 1])) == [None, None]
        assert count_parameters(model).keys().isdisjoint({"class_codes", "prompt_bases", "prompt_generator"})


@pytest.mark.parametrize("source,precision", [("lowrank", "bf16"), ("generated_residual", "bf16"),
                                              ("generated", "fp16")])
def test_autocast_and_gradient_checkpointing_train(tiny_weights, seeded_data_root, tmp_path, source, precision):
    cfg = _cfg(tiny_weights, seeded_data_root, tmp_path, **SOURCES[source], **{
        "train.precision": precision, "model.backbone.grad_checkpointing": True, "train.epochs": 1,
        "train.deterministic": False})
    trainer = Trainer(cfg, echo=_quiet)
    before = {n: p.detach().clone() for n, p in trainer.model.class_prompts.named_parameters()}
    losses = [trainer.train_step(x, y) for x, y, _ in list(trainer.loader)[:2]]
    assert all(math.isfinite(v) for v in losses)
    for n, p in trainer.model.class_prompts.named_parameters():
        assert not torch.equal(before[n], p.detach()), n
        assert p.dtype == torch.float32


# ------------------------------------------------------------------------------------------- parameter counts
def test_parameter_counts_match_the_closed_forms(tiny_weights):
    F = D  # pool=cls: the feature width is the backbone width
    model, _ = _model(tiny_weights, "lowrank")
    c = count_parameters(model)
    r = 4
    assert c["class_codes"] == C * r and c["prompt_bases"] == r * T * D
    assert "class_prompts" not in c
    report = format_parameter_report(model)
    assert "class_codes" in report and "prompt_bases" in report and "class prompts: lowrank, rank 4" in report

    model, _ = _model(tiny_weights, "generated")
    h = 8
    c = count_parameters(model)
    assert c["prompt_generator"] == 2 * F + (F * h + h) + (h * T * D + T * D)
    assert "class_codes" not in c and "class_prompts" not in c
    assert "prompt_generator" in format_parameter_report(model)
    # the descriptors are a buffer: in the checkpoint, not among the parameters
    assert "class_prompts.descriptor" in model.trainable_state()
    assert tuple(model.class_prompts.descriptor.shape) == (C, F)

    model, _ = _model(tiny_weights, "generated_residual")
    c = count_parameters(model)
    assert c["class_codes"] == C * 3 and c["prompt_bases"] == 3 * T * D
    assert c["prompt_generator"] == 2 * F + (F * h + h) + (h * T * D + T * D)


def test_the_table_source_is_class_prompts(tiny_weights):
    assert CLASS_PROMPT_SOURCES.get("table") is ClassPrompts
    torch.manual_seed(3)
    ref = ClassPrompts(C, COUNTS, D)
    torch.manual_seed(3)
    built = CLASS_PROMPT_SOURCES.get("table")(C, COUNTS, D, memory_bank=False, cfg=ClassPromptConfig(),
                                              feature_dim=D)
    assert torch.equal(ref.table, built.table)
    labels = torch.tensor([5, 5, 1, 1])
    for a, b in zip(ref(labels), built(labels), strict=True):
        assert torch.equal(a, b)
    model = create_model(tiny_config(tiny_weights).model, C)  # the default source
    assert type(model.class_prompts) is ClassPrompts and "class_prompts" in count_parameters(model)
    assert len(model.row_placements()) == 1


def test_initial_scale_is_the_tables(tiny_weights):
    counts, dim, classes = [3, 3, 1, 0], 192, 300
    torch.manual_seed(0)
    table = ClassPrompts(classes, counts, dim)
    sources = [LowRankClassPrompts(classes, counts, dim, cfg=ClassPromptConfig(source="lowrank", rank=16)),
               GeneratedClassPrompts(classes, counts, dim, cfg=ClassPromptConfig(source="generated"),
                                     feature_dim=2 * dim)]
    # descriptors as the data gives them: a large common component plus a per-class part
    sources[1].set_class_features(5.0 + torch.randn(classes, 2 * dim) * 0.3 + torch.randn(2 * dim))
    labels = torch.arange(classes)
    want = [table(labels)[i].std().item() if m else None for i, m in enumerate(counts)]
    for i, m in enumerate(counts):
        if m:
            assert want[i] == pytest.approx(_prompt_std(m, dim), rel=0.05)
    for source in sources:
        with torch.no_grad():
            got = source(labels)
        for i, m in enumerate(counts):
            if not m:
                assert got[i] is None
                continue
            assert got[i].std().item() == pytest.approx(_prompt_std(m, dim), rel=0.15), (type(source), i)
            assert got[i].mean().abs().item() < 0.2 * _prompt_std(m, dim)


# ------------------------------------------------------------------------------------------------ generated
def test_generated_prompts_follow_the_descriptor_and_cover_unseen_classes(tiny_weights):
    model, cfg = _model(tiny_weights, "generated")
    gen = model.class_prompts
    means = torch.randn(C, D)
    gen.set_class_features(means)
    torch.testing.assert_close(gen.descriptor, means - means.mean(0))  # centred over the classes (default)
    everyone = torch.arange(C)
    with torch.no_grad():
        before = [p.clone() for p in gen(everyone)]
        gen.descriptor[2] += torch.randn(D)  # only class 2's descriptor changes
        after = gen(everyone)
    for b, a in zip(before, after, strict=True):
        assert not torch.equal(b[2], a[2])
        assert torch.equal(torch.cat([b[:2], b[3:]]), torch.cat([a[:2], a[3:]]))
        assert torch.isfinite(a).all()
        assert min((a[i] - a[j]).abs().max() for i in range(C) for j in range(i)) > 0  # distinct per class
    # one training step on classes 0 and 1 moves the prompts of the never-sampled classes as well
    opt = torch.optim.SGD(gen.parameters(), lr=0.5)
    labels = torch.tensor([0, 0, 1, 1])
    torch.manual_seed(1)
    out = model.forward_train(torch.randn(4, 3, 32, 32), labels, samples_per_class=2)
    build_loss(cfg.loss)(out.embeddings, labels, out.proxy).backward()
    opt.step()
    with torch.no_grad():
        moved = gen(everyone)
    for a, m in zip(after, moved, strict=True):
        assert not torch.equal(a[4], m[4]) and torch.isfinite(m[4]).all()


def test_generated_descriptors_are_the_class_mean_frozen_features(tiny_weights, seeded_data_root, tmp_path):
    from promptdml.engine.evaluator import class_means, embed_records

    cfg = _cfg(tiny_weights, seeded_data_root, tmp_path, **SOURCES["generated"])
    trainer = Trainer(cfg, echo=_quiet)
    train = trainer.splits.train
    feats = embed_records(trainer.model, train, cfg, trainer.device, trainer.dtype, frozen_features=True,
                          normalize=False)
    means = class_means(feats, torch.as_tensor(train.labels), train.num_classes)
    torch.testing.assert_close(trainer.model.class_prompts.descriptor, means - means.mean(0))


def test_memory_bank_is_for_the_table_only(tiny_weights):
    with pytest.raises(ConfigError, match="model.memory_bank=off"):
        tiny_config(tiny_weights, **{"model.class_prompts.source": "lowrank", "model.memory_bank": "on"})
    with pytest.raises(ConfigError, match="generated_residual"):
        load_config(None, {"model.class_prompts.generated_residual": True})
    with pytest.raises(ConfigError, match="model.class_prompts.rank"):
        load_config(None, {"model.class_prompts.rank": 0})
    cfg = tiny_config(tiny_weights, **{"model.class_prompts.source": "generated", "model.memory_bank": "auto",
                                       "model.memory_bank_threshold": 2})
    assert not create_model(cfg.model, C).memory_bank  # auto: off for a source without a table


# ----------------------------------------------------------------------------------- checkpoints and resume
@pytest.mark.parametrize("source", ["lowrank", "generated_residual"])
def test_trainable_checkpoint_round_trip(tiny_weights, tmp_path, source):
    model, cfg = _model(tiny_weights, source)
    with torch.no_grad():
        for p in model.class_prompts.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        if hasattr(model.class_prompts, "descriptor"):
            model.class_prompts.descriptor.normal_()
    path = save_checkpoint(model, cfg, tmp_path / "model.safetensors")
    loaded, _ = load_model(path)
    labels = torch.tensor([0, 4, 5])
    with torch.no_grad():
        for a, b in zip(model.class_prompts(labels), loaded.class_prompts(labels), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("source", ["lowrank", "generated"])
def test_resume_is_bitwise_identical(tiny_weights, seeded_data_root, tmp_path, source):
    over = SOURCES[source]
    straight = Trainer(_cfg(tiny_weights, seeded_data_root, tmp_path / "a", **over), echo=_quiet)
    result = straight.fit()
    first = Trainer(_cfg(tiny_weights, seeded_data_root, tmp_path / "b", **over), echo=_quiet)
    first._end_epoch(first._train_epoch())  # one epoch, then the process "stops"
    del first
    runs = [tmp_path / "b" / "r"]
    if source == "generated":  # a resume state without the descriptors: recomputed from the training images
        shutil.copytree(runs[0], tmp_path / "c" / "r")
        runs.append(tmp_path / "c" / "r")
        state = torch.load(runs[1] / RESUME_DIR / LAST, weights_only=False)
        del state["model"]["class_prompts.descriptor"]
        torch.save(state, runs[1] / RESUME_DIR / LAST)
    sa = straight.model.trainable_state()
    for run in runs:
        resumed = Trainer(_cfg(tiny_weights, seeded_data_root, run.parent, **over), run_dir=run, echo=_quiet, resume=True)
        assert resumed.epoch == 1
        result_b = resumed.fit()
        sb = resumed.model.trainable_state()
        assert set(sa) == set(sb)
        for key in sa:
            assert torch.equal(sa[key], sb[key]), (run, key)
        assert result.metrics == result_b.metrics
        assert [r["loss"] for r in result.history] == [r["loss"] for r in result_b.history]


# -------------------------------------------------------------------------------------------------- DDP
def test_two_processes_equal_one_process_generated(tiny_weights, seeded_data_root, tmp_path):
    o = _overrides(seeded_data_root, tmp_path / "runs", **{"optim.optimizer": "sgd",
                                                   **SOURCES["generated_residual"]})
    launch(tmp_path, tiny_weights, [{"kind": "steps", "name": "steps", "overrides": o}])
    ranks = _load(tmp_path, "steps")
    torch.set_num_threads(1)
    single = Trainer(tiny_config(tiny_weights, **{**o, "train.run_name": "single"}), echo=_quiet)
    single._train_epoch()
    assert len(single.optimizers) == 2  # no row optimiser: the source's parameters are dense
    ref = {k: v.detach().cpu() for k, v in single.model.trainable_state().items()}
    assert {"class_prompts.descriptor", "class_prompts.net.3.weight", "class_prompts.residual.codes"} <= set(ref)
    for r in ranks:
        _assert_same(r["state"], ref)
        assert r["global_step"] == 3
        assert not any(tag.startswith("class_prompts/") for tag in r["traffic"])  # no row exchange
    for key in ranks[0]["state"]:
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
