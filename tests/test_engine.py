"""Resume, atomic checkpoints, non-finite losses, model selection on the validation split."""

import pytest
import torch
from conftest import tiny_config
from data_fixtures import make_folder

from promptdml.engine import Trainer, TrainingError
from promptdml.engine.state import LAST, RESUME_DIR, load_resume_state


@pytest.fixture
def data_root(tmp_path):
    return make_folder(tmp_path / "imgs", {f"c{i:02d}": 4 for i in range(12)})


def _cfg(tiny_weights, root, out, **extra):
    overrides = {"data.dataset": "folder", "data.root": str(root), "data.batch_size": 4,
                 "data.samples_per_class": 2, "data.batches_per_epoch": 3, "train.epochs": 2,
                 "train.output_dir": str(out), "train.run_name": "r", "train.deterministic": True,
                 "optim.lr": 0.05, "optim.optimizer": "adamw", "eval.batch_size": 8}
    overrides.update(extra)
    return tiny_config(tiny_weights, **overrides)


def _quiet(_):
    pass


def test_resume_is_bitwise_identical(tiny_weights, data_root, tmp_path):
    straight = Trainer(_cfg(tiny_weights, data_root, tmp_path / "a"), echo=_quiet)
    result = straight.fit()

    first = Trainer(_cfg(tiny_weights, data_root, tmp_path / "b"), echo=_quiet)
    first._end_epoch(first._train_epoch())  # one epoch, then the process "stops"
    del first
    resumed = Trainer(_cfg(tiny_weights, data_root, tmp_path / "b"), run_dir=tmp_path / "b" / "r", echo=_quiet,
                      resume=True)
    assert resumed.epoch == 1
    result_b = resumed.fit()
    sa, sb = straight.model.trainable_state(), resumed.model.trainable_state()
    assert set(sa) == set(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert result.metrics == result_b.metrics
    assert [r["loss"] for r in result.history] == [r["loss"] for r in result_b.history]


def test_resume_mid_epoch_after_signal(tiny_weights, data_root, tmp_path):
    import signal

    from promptdml.engine.trainer import TrainingInterrupted

    trainer = Trainer(_cfg(tiny_weights, data_root, tmp_path), echo=_quiet)
    original = trainer.train_step

    def step_then_signal(images, labels):
        value = original(images, labels)
        if trainer.global_step == 1:  # the signal arrives during the 2nd step
            trainer._stop_signal = signal.SIGINT
        return value

    trainer.train_step = step_then_signal
    with pytest.raises(TrainingInterrupted, match="--resume"):
        trainer.fit()
    state = load_resume_state(trainer.run_dir)
    assert state["epoch"] == 0 and state["step_in_epoch"] == 2
    resumed = Trainer(trainer.cfg, run_dir=trainer.run_dir, echo=_quiet, resume=True)
    result = resumed.fit()
    assert resumed.global_step == 2 * 3 and len(result.history) == 2


def test_signal_that_also_stopped_the_loader_workers_is_an_interruption(tiny_weights, data_root, tmp_path):
    """Ctrl-C / SIGTERM sent to the whole process group kills the DataLoader workers too: the loader raises a
    RuntimeError mid-epoch, which then reads as the interruption it is (resumable), not as a crash."""
    import signal

    from promptdml.engine.trainer import TrainingInterrupted

    trainer = Trainer(_cfg(tiny_weights, data_root, tmp_path), echo=_quiet)
    original = trainer.train_step

    def step(images, labels):
        if trainer.epoch == 1:
            trainer._stop_signal = signal.SIGTERM
            raise RuntimeError("DataLoader worker (pid 123) is killed by signal: Terminated.")
        return original(images, labels)

    trainer.train_step = step
    with pytest.raises(TrainingInterrupted, match="end of epoch 1.*--resume"):
        trainer.fit()
    assert load_resume_state(trainer.run_dir)["epoch"] == 1
    trainer = Trainer(_cfg(tiny_weights, data_root, tmp_path / "b"), echo=_quiet)
    trainer.train_step = lambda images, labels: (_ for _ in ()).throw(RuntimeError("a real bug"))
    with pytest.raises(RuntimeError, match="a real bug"):  # without a stop signal: unchanged
        trainer.fit()


def test_crash_during_checkpoint_write_keeps_previous(tiny_weights, data_root, tmp_path, monkeypatch):
    trainer = Trainer(_cfg(tiny_weights, data_root, tmp_path, **{"train.epochs": 3}), echo=_quiet)
    trainer._end_epoch(trainer._train_epoch())
    good = load_resume_state(trainer.run_dir)

    def dying_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("simulated crash in the middle of the write")

    monkeypatch.setattr(torch, "save", dying_save)
    row = trainer._train_epoch()
    with pytest.raises(OSError):
        trainer._end_epoch(row)
    monkeypatch.undo()
    state = load_resume_state(trainer.run_dir)  # the previous 'last' is intact
    assert state["epoch"] == good["epoch"] == 1
    assert (trainer.run_dir / RESUME_DIR / LAST).is_file()


def test_nonfinite_losses_are_skipped_then_abort(tiny_weights, data_root, tmp_path):
    trainer = Trainer(_cfg(tiny_weights, data_root, tmp_path, **{"train.epochs": 1}), echo=_quiet)
    real_loss = trainer.loss_fn
    calls = {"n": 0}

    def sometimes_nan(*args):
        calls["n"] += 1
        value = real_loss(*args)
        return value * float("nan") if calls["n"] in (1, 3) else value

    trainer.loss_fn = sometimes_nan
    before = trainer.model.shared_prompts.params["0"].detach().clone()
    result = trainer.fit()
    assert trainer.skipped_steps == 2 and result.history[-1]["skipped_steps"] == 2
    assert not torch.equal(before, trainer.model.shared_prompts.params["0"])  # the good step trained

    trainer = Trainer(_cfg(tiny_weights, data_root, tmp_path / "x", **{"train.max_nonfinite_steps": 3}),
                      echo=_quiet)
    trainer.loss_fn = lambda *args: real_loss(*args) * float("nan")
    with pytest.raises(TrainingError, match="non-finite for 3 consecutive steps"):
        trainer.fit()


def test_best_checkpoint_selected_on_validation_split_only(tiny_weights, data_root, tmp_path):
    cfg = _cfg(tiny_weights, data_root, tmp_path, **{"data.val_ratio": 0.34, "train.epochs": 3, "eval.every": 1})
    trainer = Trainer(cfg, echo=_quiet)
    assert trainer.splits.val is not None and trainer.splits.val.num_classes == 2
    calls = []
    scores = {"val": [0.2, 0.5, 0.3], "test": [0.9, 0.1, 0.95]}  # test would pick epoch 3

    def fake_evaluate(split="test", frozen_features=False):
        calls.append(split)
        value = scores[split][trainer.epoch - 1]
        return {"recall@1": value, "map@r": value}

    trainer.evaluate = fake_evaluate
    trainer.fit()
    assert trainer.best == {"epoch": 2, "value": 0.5}
    assert (trainer.run_dir / RESUME_DIR / "best.safetensors").is_file()
    assert calls == ["val", "test"] * 3
    import json

    summary = json.loads((trainer.run_dir / "metrics.json").read_text())
    assert summary["best"]["selected_by"] == "val_map@r" and summary["best"]["epoch"] == 2


def test_training_without_the_test_split_validates_only(tiny_weights, data_root, tmp_path):
    """Splits built with with_test=False (promptdml tune): nothing is evaluated on test, not even before
    training, and the run directory reports the validation metrics."""
    import json

    from promptdml.data import build_splits

    cfg = _cfg(tiny_weights, data_root, tmp_path, **{"data.val_ratio": 0.34, "train.epochs": 2,
                                                      "eval.before_training": True})
    splits = build_splits(cfg.data, with_test=False)
    trainer = Trainer(cfg, splits=splits, echo=_quiet)
    calls = []
    real = trainer.evaluate

    def spy(split="test", frozen_features=False):
        calls.append(split)
        return real(split, frozen_features)

    trainer.evaluate = spy
    result = trainer.fit()
    assert calls == ["val", "val"]
    assert result.metrics == {}
    summary = json.loads((trainer.run_dir / "metrics.json").read_text())
    assert summary["test"] == {} and summary["val"]["map@r"] == result.history[-1]["val_map@r"]
    card = (trainer.run_dir / "README.md").read_text()
    assert "Validation metrics" in card and "the test split was not built" in card and "| map@r |" in card


def test_on_epoch_callback_sees_each_row_and_can_stop_training(tiny_weights, data_root, tmp_path):
    cfg = _cfg(tiny_weights, data_root, tmp_path, **{"data.val_ratio": 0.34, "train.epochs": 3})
    rows = []
    Trainer(cfg, echo=_quiet).fit(on_epoch=rows.append)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and all("val_map@r" in r for r in rows)

    class Stop(Exception):
        pass

    def stop_after_two(row):
        if row["epoch"] == 2:
            raise Stop

    trainer = Trainer(_cfg(tiny_weights, data_root, tmp_path / "b", **{"data.val_ratio": 0.34,
                                                                         "train.epochs": 3}), echo=_quiet)
    with pytest.raises(Stop):
        trainer.fit(on_epoch=stop_after_two)
    assert trainer.epoch == 2 and len(trainer.history) == 2
    assert load_resume_state(trainer.run_dir)["epoch"] == 2  # the stopped epoch's state is saved
    assert not (trainer.run_dir / "metrics.json").exists()


def test_tensorboard_events_and_keep_n(tiny_weights, data_root, tmp_path):
    pytest.importorskip("tensorboard")
    cfg = _cfg(tiny_weights, data_root, tmp_path, **{"train.epochs": 3, "train.keep_checkpoints": 2})
    trainer = Trainer(cfg, echo=_quiet)
    trainer.fit()
    assert list((trainer.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    kept = sorted(p.name for p in (trainer.run_dir / RESUME_DIR).glob("epoch_*.pt"))
    assert kept == ["epoch_0002.pt", "epoch_0003.pt"]


def test_proxy_geometry_logged_and_collapse_warned(tiny_weights, data_root, tmp_path, caplog):
    import csv

    import torch.nn.functional as F

    cfg = _cfg(tiny_weights, data_root, tmp_path, **{"train.epochs": 1})
    trainer = Trainer(cfg, echo=_quiet)
    result = trainer.fit()
    row = result.history[-1]
    assert row == pytest.approx(row | trainer.model.proxies.geometry())  # measured after the epoch's last step
    with open(trainer.run_dir / "log.csv") as f:
        logged = list(csv.DictReader(f))[-1]
    assert float(logged["proxy_cos"]) == pytest.approx(row["proxy_cos"])
    assert float(logged["container_cos"]) == pytest.approx(row["container_cos"])
    assert float(logged["embedding_cos"]) == pytest.approx(row["embedding_cos"])
    assert -1.0 < row["embedding_cos"] <= 1.0
    assert "proxy collapse" not in caplog.text  # (the tiny random backbone's embeddings are alike: no assertion)
    # collapse the container onto one direction: the next epoch warns (once)
    cfg2 = _cfg(tiny_weights, data_root, tmp_path / "b", **{"train.epochs": 2})
    trainer2 = Trainer(cfg2, echo=_quiet)
    with torch.no_grad():
        trainer2.model.proxies.container.copy_(F.normalize(torch.ones_like(trainer2.model.proxies.container), dim=-1))
        trainer2.model.proxies.gru.requires_grad_(False)
        for p in trainer2.model.proxies.gru.parameters():
            p.zero_()
        trainer2.model.proxies.gru.x_proj.bias[-trainer2.model.proxies.gru.x_proj.bias.shape[0] // 3:].fill_(1.0)
    with caplog.at_level("WARNING", logger="promptdml"):
        trainer2.fit()
    assert caplog.text.count("proxy collapse") == 1


def test_embedding_collapse_warned(tiny_weights, data_root, tmp_path, caplog):
    # an embedding head that maps every image to the same vector: the batch embeddings' mean cosine is 1
    cfg = _cfg(tiny_weights, data_root, tmp_path, **{"train.epochs": 4})
    trainer = Trainer(cfg, echo=_quiet)
    fc = trainer.model.embed_head.fc
    with torch.no_grad():
        fc.weight.zero_()
        fc.bias.fill_(1.0)
    fc.requires_grad_(False)
    with caplog.at_level("WARNING", logger="promptdml"):
        result = trainer.fit()
    assert [r["embedding_cos"] for r in result.history] == pytest.approx([1.0] * 4, abs=1e-5)
    # embeddings huddle together early in every run: the warning waits for the third epoch, then fires once
    assert caplog.text.count("embedding collapse (epoch 3)") == 1 and caplog.text.count("embedding collapse") == 1
    assert "between a batch's embeddings 1.00" in caplog.text


def test_peak_memory_window_is_per_run():
    import os

    from promptdml.engine.trainer import peak_memory_mb as _peak_memory_mb
    from promptdml.engine.trainer import reset_peak_memory

    if not os.path.exists("/proc/self/status"):
        pytest.skip("peak RSS window needs Linux /proc")
    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    before = _peak_memory_mb(cpu)
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    grown = _peak_memory_mb(cpu)
    del block
    reset_peak_memory(cpu)
    after = _peak_memory_mb(cpu)
    if after >= grown:
        pytest.skip("peak RSS cannot be reset on this system")
    assert grown >= before + 60 and after < grown - 30


def test_linear_warmup_scales_every_learning_rate_per_step(tiny_weights, data_root, tmp_path):
    # 3 steps per epoch, warmup over the first epoch: steps 1-3 use 1/3, 2/3, 3/3 of the scheduled rate
    cfg = _cfg(tiny_weights, data_root, tmp_path, **{"optim.optimizer": "sgd", "optim.warmup_epochs": 1.0})
    trainer = Trainer(cfg, echo=_quiet)
    seen: list[tuple[float, float, float]] = []
    main, proxy, rows = trainer.optimizers  # the class-prompt rows: a LazyRowOptimizer stepped like the others
    step_rows = rows.step

    def record_rows(*args, **kwargs):
        seen.append((main.param_groups[0]["lr"], proxy.param_groups[0]["lr"], rows.param_groups[0]["lr"]))
        return step_rows(*args, **kwargs)

    rows.step = record_rows
    result = trainer.fit()
    lr, lr_proxy = cfg.optim.lr, cfg.optim.lr_proxy
    epoch2 = result.history[1]["lr"] / lr  # the cosine schedule's factor in epoch 2
    factors = [1 / 3, 2 / 3, 1.0, epoch2, epoch2, epoch2]
    assert [s[0] for s in seen] == pytest.approx([lr * f for f in factors])
    assert [s[1] for s in seen] == pytest.approx([lr_proxy * f for f in factors])
    assert [s[2] for s in seen] == pytest.approx([lr * f for f in factors])  # the class-prompt rows too
    assert epoch2 < 1.0
    # the scaling is per step only: the optimisers are left at the schedule's rate
    assert main.param_groups[0]["lr"] == pytest.approx(trainer.schedulers[0].get_last_lr()[0])


def test_warmup_longer_than_training_is_rejected(tiny_weights, data_root, tmp_path):
    from promptdml.config import ConfigError

    with pytest.raises(ConfigError, match="optim.warmup_epochs"):
        _cfg(tiny_weights, data_root, tmp_path, **{"optim.warmup_epochs": 3.0})


def test_head_warmup_holds_the_backbone_parts_then_releases_them(tiny_weights, data_root, tmp_path):
    # 3 steps per epoch; during the first epoch only heads, proxies and the proxy generator move
    cfg = _cfg(tiny_weights, data_root, tmp_path, **{"optim.optimizer": "sgd", "optim.head_warmup_epochs": 1.0,
                                                     "train.epochs": 2})
    trainer = Trainer(cfg, echo=_quiet)
    groups = trainer.model.trainable_groups()
    assert {"shared_prompts", "bitfit", "embed_head", "proxy_bias", "class_prompts"} <= set(groups)

    def snapshot():
        return {g: [p.detach().clone() for _, p in ps] for g, ps in groups.items()}

    def changed(a, b):
        return {g for g in a if any(not torch.equal(x, y) for x, y in zip(a[g], b[g], strict=True))}

    start = snapshot()
    trainer.cfg.train.epochs = 1  # run the warm-up epoch alone, then continue in the same trainer
    trainer.fit()
    after_warmup = snapshot()
    assert changed(start, after_warmup) == set(groups) - {"shared_prompts", "bitfit"}
    trainer.cfg.train.epochs = 2
    trainer.fit()
    assert {"shared_prompts", "bitfit"} <= changed(after_warmup, snapshot())


def test_container_rows_are_kept_when_the_grad_scaler_skips_a_step(tiny_weights, data_root, tmp_path):
    """fp16 loss scaling: an overflowing step is skipped by GradScaler; the container must not move either."""
    trainer = Trainer(_cfg(tiny_weights, data_root, tmp_path, **{"train.epochs": 1}), echo=_quiet)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, enabled=True)
    weight = trainer.model.embed_head.fc.weight
    overflow = {"on": True}
    weight.register_hook(lambda g: g * float("inf") if overflow["on"] else g)
    images, labels, _ = next(iter(trainer.loader))
    container = trainer.model.proxies.container.clone()
    prompts = trainer.model.shared_prompts.params["0"].detach().clone()
    trainer.train_step(images, labels)
    assert trainer.skipped_steps == 1
    assert torch.equal(container, trainer.model.proxies.container)  # rows not written after the skipped step
    assert torch.equal(prompts, trainer.model.shared_prompts.params["0"])  # optimisers skipped too
    overflow["on"] = False
    trainer.train_step(images, labels)
    assert trainer.skipped_steps == 1
    assert not torch.equal(container, trainer.model.proxies.container)


def test_plain_proxies_use_the_small_init_unless_kaiming_is_named():
    from promptdml.config import ProxyConfig
    from promptdml.models.proxies import SemanticProxies

    torch.manual_seed(0)
    small = SemanticProxies(1000, 384, ProxyConfig(semantic=False)).bias
    # N(0, 0.01) rows: norm ~ 0.01 * sqrt(384) = 0.196
    assert abs(small.norm(dim=1).mean().item() - 0.01 * 384 ** 0.5) < 0.01
    kaiming = SemanticProxies(1000, 384, ProxyConfig(semantic=False, bias_init="kaiming")).bias
    # kaiming_normal_ with fan_out on [C, E]: std sqrt(2 / C)
    assert abs(kaiming.std().item() - (2 / 1000) ** 0.5) < 0.002


def test_proxies_start_at_the_class_means_of_the_training_images(tiny_weights, data_root, tmp_path):
    from promptdml.data import build_transforms
    from promptdml.data.images import load_rgb

    cfg = _cfg(tiny_weights, data_root, tmp_path, **{"model.proxy.bias_init": "class_mean",
                                                       "model.proxy.container_init": "class_mean",
                                                       "model.head_init": "centered", "train.precision": "fp32"})
    trainer = Trainer(cfg, echo=_quiet)
    model, train = trainer.model, trainer.splits.train
    transform = build_transforms(model.data_config, cfg.model.backbone.img_size, train=False)
    model.eval()
    with torch.no_grad():  # brute force
        every = torch.stack([transform(load_rgb(p)) for p in train.paths])
        all_labels = torch.as_tensor(train.labels)
        for branch, head in (("embedding", model.embed_head), ("proxy", model.proxy_head)):
            ln = model.head_inputs(every, all_labels, branch)  # centred heads: the Linear's input averages zero
            assert ln.mean(0).abs().max() < 1e-4 * ln.abs().mean()
            z = head.unnormalized(model.backbone(every, model.shared_prompts() if branch == "embedding" else
                                                 model.class_prompts(all_labels)))
            assert z.mean(0).abs().max() < 1e-4 * z.abs().mean()  # and so do the embeddings before L2
        for c in (0, train.num_classes - 1):
            idx = [i for i, y in enumerate(train.labels) if y == c]
            images = torch.stack([transform(load_rgb(train.paths[i])) for i in idx])
            labels = torch.full((len(idx),), c)
            emb = model(images).mean(0)
            q = model.proxy_features(images, labels).mean(0)
            torch.testing.assert_close(model.proxies.bias[c], emb / emb.norm(), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(model.proxies.container[c], q / q.norm(), atol=1e-5, rtol=1e-4)
    # the default init is untouched by the option's code path, and the run's random stream too
    plain = Trainer(_cfg(tiny_weights, data_root, tmp_path / "p"), echo=_quiet)
    assert plain.model.proxies.bias.norm(dim=1).mean() < 0.5
    assert torch.equal(plain.model.shared_prompts.params["0"], model.shared_prompts.params["0"])


def test_backbone_lr_scale_scales_only_the_backbone_side_steps(tiny_weights, data_root, tmp_path):
    deltas = []
    for scale in (1.0, 0.25):
        t = Trainer(_cfg(tiny_weights, data_root, tmp_path / str(scale), **{
            "optim.optimizer": "sgd", "optim.weight_decay": 0.0, "optim.backbone_lr_scale": scale,
            "train.precision": "fp32"}), echo=_quiet)
        m = t.model
        tensors = {"prompt": m.shared_prompts.params["0"], "bitfit": m.backbone.vit.blocks[0].attn.qkv.bias,
                   "head": m.embed_head.fc.weight, "gru": m.proxies.gru.x_proj.weight}
        before = {k: v.detach().clone() for k, v in tensors.items()}
        images, labels, _ = next(iter(t.loader))
        t.train_step(images, labels)
        deltas.append({k: (tensors[k].detach() - before[k]) for k in tensors})
        # a delta read back as (w - lr * g) - w carries the rounding of w: up to one unit in its last place
        ulp = {k: 2 * torch.finfo(torch.float32).eps * before[k].abs().max().item() for k in tensors}
    full, scaled = deltas
    for k in ("prompt", "bitfit"):  # first SGD step: the update is lr * grad, the gradient is the same
        torch.testing.assert_close(scaled[k], 0.25 * full[k], rtol=1e-4, atol=max(ulp[k], 1e-9))
    for k in ("head", "gru"):
        torch.testing.assert_close(scaled[k], full[k], rtol=1e-5, atol=max(ulp[k], 1e-9))
    assert full["prompt"].abs().max() > 0


def test_step_log_and_tensorboard_steps_follow_the_saved_state(tiny_weights, data_root, tmp_path):
    """steps.csv (train.log_steps) has one row per step, ends where the saved state ends, and a resume continues
    it without duplicates; TensorBoard gets step/loss and step/lr at every step."""
    import csv
    import signal

    from promptdml.engine.trainer import TrainingInterrupted

    cfg = _cfg(tiny_weights, data_root, tmp_path, **{"train.log_steps": True, "optim.warmup_epochs": 1.0,
                                                      "train.tensorboard": False})
    trainer = Trainer(cfg, echo=_quiet)
    original = trainer.train_step

    def step_then_signal(images, labels):
        value = original(images, labels)
        if trainer.global_step == 4:  # stop during the 2nd epoch, after its first step
            trainer._stop_signal = signal.SIGINT
        return value

    trainer.train_step = step_then_signal
    with pytest.raises(TrainingInterrupted):
        trainer.fit()

    def rows():
        with open(trainer.run_dir / "steps.csv", newline="") as f:
            return list(csv.DictReader(f))

    assert [int(r["step"]) for r in rows()] == [1, 2, 3, 4, 5]
    assert [int(r["epoch"]) for r in rows()] == [1, 1, 1, 2, 2]
    # warm-up: the logged lr is the one each step used, rising linearly over the first epoch (3 steps)
    lrs = [float(r["lr"]) for r in rows()[:3]]
    assert lrs == pytest.approx([cfg.optim.lr / 3, 2 * cfg.optim.lr / 3, cfg.optim.lr])
    resumed = Trainer(cfg, run_dir=trainer.run_dir, echo=_quiet, resume=True)
    resumed.fit()
    assert [int(r["step"]) for r in rows()] == list(range(1, 7))
    assert all(float(r["loss"]) > 0 for r in rows())


def test_tensorboard_has_per_step_loss_and_lr(tiny_weights, data_root, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = Trainer(_cfg(tiny_weights, data_root, tmp_path, **{"train.tensorboard": True}), echo=_quiet)
    trainer.fit()
    events = EventAccumulator(str(trainer.run_dir / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"step/loss", "step/lr", "step/lr_proxy", "train/loss", "test/recall@1"} <= set(tags)
    assert [e.step for e in events.Scalars("step/loss")] == list(range(1, 7))  # 2 epochs x 3 steps
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]


def test_missing_viz_extra_is_named_once_and_the_run_goes_on(tiny_weights, data_root, tmp_path, monkeypatch,
                                                              caplog):
    import sys

    from promptdml import extras

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setattr(extras, "_warned", set())
    cfg = _cfg(tiny_weights, data_root, tmp_path, **{"train.tensorboard": True, "train.plot": True})
    with caplog.at_level("WARNING", logger="promptdml"):
        run = Trainer(cfg, echo=_quiet).fit().run_dir
    messages = [r.getMessage() for r in caplog.records if 'promptdml[viz]' in r.getMessage()]
    assert len(messages) == 2  # one for the plot, one for TensorBoard, not one per epoch
    assert any("training.png" in m and "train.plot=false" in m for m in messages)
    assert any("TensorBoard" in m and "'tensorboard' package" in m and "train.tensorboard=false" in m
               for m in messages)
    assert (run / "model.safetensors").is_file() and not (run / "training.png").exists()
    assert not (run / "tensorboard").exists()
