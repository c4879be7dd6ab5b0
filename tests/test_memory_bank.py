"""The class-prompt memory bank and its row-wise (lazy) optimiser."""

import pytest
import torch
from conftest import tiny_config

from promptdml.engine import Trainer
from promptdml.engine.factory import TrainParts
from promptdml.engine.optim import build_optimizers
from promptdml.losses import build_loss
from promptdml.models import create_model
from promptdml.models.memory_bank import RowwiseOptimizer

NUM_CLASSES = 8
STEPS = [[0, 3, 5], [3, 1, 7], [5, 2, 3]]  # the batch's classes per step; class 3 is in every batch



def bare_trainer(cfg, model):
    """A Trainer around ``model`` without data or run directory, to call the real ``train_step``."""
    parts = TrainParts(cfg=cfg, model=model, loss_fn=build_loss(cfg.loss), optimizers=build_optimizers(model, cfg))
    return Trainer(cfg, parts=parts)


def row_state(trainer, model):
    """The class-prompt table's optimiser state (momentum / Adam moments, per-row steps) by name."""
    rows = trainer.optimizers[-1]
    return rows.state[model.class_prompts.placement.holder]


def batches(seed=0, k=2):
    g = torch.Generator().manual_seed(seed)
    for classes in STEPS:
        labels = torch.tensor(classes).repeat_interleave(k)
        yield torch.randn(len(labels), 3, 32, 32, generator=g), labels


def train_three_steps(cfg):
    torch.manual_seed(0)
    model = create_model(cfg.model, NUM_CLASSES).train()
    trainer = bare_trainer(cfg, model)
    for images, labels in batches():
        loss = trainer.train_step(images, labels)
        assert loss == loss  # not NaN
    return model, trainer


@pytest.mark.parametrize("optimizer,extra", [("sgd", {}), ("adamw", {"optim.weight_decay": 1e-2}),
                                             ("sgd", {"optim.grad_clip": 0.05, "loss.proxy_range": "in_batch"})])
def test_bank_on_equals_bank_off(tiny_weights, optimizer, extra):
    overrides = {"optim.optimizer": optimizer, "optim.lr": 0.05, **extra}
    off, trainer = train_three_steps(tiny_config(tiny_weights, **{"model.memory_bank": "off"}, **overrides))
    on, trainer_on = train_three_steps(tiny_config(tiny_weights, **{"model.memory_bank": "on"}, **overrides))
    assert not off.memory_bank and on.memory_bank
    s_off, s_on = off.trainable_state(), on.trainable_state()
    assert set(s_off) == set(s_on)  # same checkpoint keys either way
    for name in s_off:
        torch.testing.assert_close(s_on[name], s_off[name], atol=1e-6, rtol=0, msg=name)
    st_off = row_state(trainer, off)
    st_on = row_state(trainer_on, on)
    assert set(st_off) == set(st_on) and st_off
    for name in st_off:
        torch.testing.assert_close(st_on[name], st_off[name], atol=1e-6, rtol=0)
    # lazy semantics: classes never in a batch (4, 6) kept their initial prompts
    torch.manual_seed(0)
    init = create_model(off.cfg, NUM_CLASSES).class_prompts.table.detach()
    for c in (4, 6):
        assert torch.equal(off.class_prompts.table[c].detach(), init[c])
    for c in (0, 1, 2, 3, 5, 7):
        assert not torch.equal(off.class_prompts.table[c].detach(), init[c])
    # the class prompts are stepped by the row-wise optimiser only, not by the dense torch optimisers
    opt_params = {id(p) for opt in trainer.optimizers[:2] for g in opt.param_groups for p in g["params"]}
    assert id(off.class_prompts.table) not in opt_params


def test_bank_keeps_no_class_table_on_the_device(tiny_weights):
    cfg = tiny_config(tiny_weights, **{"model.memory_bank": "on", "optim.optimizer": "adamw"})
    model = create_model(cfg.model, NUM_CLASSES).train()
    bank = model.class_prompts.table
    C, T, D = bank.shape
    registered = list(model.named_parameters()) + list(model.named_buffers())
    assert all(t.data_ptr() != bank.data_ptr() for _, t in registered)
    assert not any(t.dim() == 3 and t.shape[0] == C for _, t in registered), "a [C, T, D] tensor is registered"
    assert all(not n.startswith("class_prompts") for n, _ in registered)
    trainer = bare_trainer(cfg, model)
    images, labels = next(batches())
    with torch.autocast("cpu", enabled=False):
        out = model.forward_train(images, labels, 2)
    rows = model.class_prompts.rows
    assert rows is not None and rows.shape == (3, T, D) and rows.requires_grad  # only the batch's rows
    del out
    trainer.train_step(images, labels)
    assert model.class_prompts.rows is None  # released after the step
    state = row_state(trainer, model)
    assert state and all(v.device == bank.device and v.shape[0] == C for v in state.values())
    assert all(v.data_ptr() not in {t.data_ptr() for _, t in registered} for v in state.values())
    # the trainable state still names the table like the bank-off model, and loads into one
    off = create_model(tiny_config(tiny_weights, **{"model.memory_bank": "off"}).model, NUM_CLASSES)
    off.load_trainable_state(model.trainable_state())
    assert torch.equal(off.class_prompts.table.detach(), bank)
    model.load_trainable_state(off.trainable_state())


def test_memory_bank_auto_threshold(tiny_weights):
    cfg = tiny_config(tiny_weights, **{"model.memory_bank_threshold": 6})
    assert create_model(cfg.model, 6).memory_bank
    assert not create_model(cfg.model, 5).memory_bank
    cfg = tiny_config(tiny_weights, **{"model.memory_bank": "on", "model.proxy.semantic": False})
    assert not create_model(cfg.model, 5).memory_bank  # no class prompts without the semantic branch


# --------------------------------------------------------------------------------------------------
# the row-wise optimiser against torch's optimisers (independent oracle)

def _torch_opt(kind, params, lr, wd):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_rowwise_optimizer_matches_torch_per_row(kind):
    torch.manual_seed(0)
    C, T, D = 5, 3, 4
    lr, wd = 0.1, 0.05
    table = torch.randn(C, T, D)
    init = table.clone()
    opt = RowwiseOptimizer(kind, momentum=0.9, weight_decay=wd)
    row_every = torch.nn.Parameter(init[2].clone())  # class 2: present in every step
    row_some = torch.nn.Parameter(init[4].clone())  # class 4: present in steps 0 and 2 only
    ref_every = _torch_opt(kind, [row_every], lr, wd)
    ref_some = _torch_opt(kind, [row_some], lr, wd)
    present = [[2, 4, 0], [1, 2], [4, 2]]
    for step, classes in enumerate(present):
        lr_step = lr * (1 - 0.2 * step)  # a schedule changes the lr between steps
        for ref in (ref_every, ref_some):
            ref.param_groups[0]["lr"] = lr_step
        grads = torch.randn(len(classes), T, D)
        opt.step(table, torch.tensor(classes), grads, lr_step)
        row_every.grad = grads[classes.index(2)].clone()
        ref_every.step()
        if 4 in classes:
            row_some.grad = grads[classes.index(4)].clone()
            ref_some.step()
    torch.testing.assert_close(table[2], row_every.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(table[4], row_some.detach(), atol=1e-6, rtol=0)
    assert torch.equal(table[3], init[3])  # never present: untouched (no momentum drift, no decay)
    if kind == "adamw":
        assert opt.state["step"].tolist() == [1, 1, 3, 0, 2]


def test_rowwise_optimizer_rejects_unknown_kind():
    with pytest.raises(ValueError, match="sgd"):
        RowwiseOptimizer("adam")
