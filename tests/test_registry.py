"""Extension points: a tuner and a loss registered from outside the package train end to end; the class-prompt
optimiser is a torch optimiser that GradScaler, clipping, schedulers and state_dict treat like the others."""

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import tiny_config
from data_fixtures import make_folder

from promptdml.engine import Trainer
from promptdml.engine.factory import TrainParts
from promptdml.engine.optim import build_optimizers, build_schedulers
from promptdml.losses import ProxyAnchorLoss, ProxyLoss, build_loss
from promptdml.models import create_model, format_parameter_report
from promptdml.models.memory_bank import LazyRowOptimizer
from promptdml.models.tuners import Tuner, register_tuner
from promptdml.registry import LOSSES, TUNERS


class Scale(nn.Module):
    """A toy tuner: a learnable per-channel gain on every block's output (forward hooks, zero-initialised)."""

    def __init__(self, blocks: nn.ModuleList, width: int) -> None:
        super().__init__()
        self.gains = nn.Parameter(torch.zeros(len(blocks), width))
        for i, block in enumerate(blocks):
            block.register_forward_hook(lambda m, a, out, i=i: out * (1 + self.gains[i]))


@pytest.fixture
def toy_tuner():
    register_tuner(Tuner("toy_scale", lambda site: Scale(site.vit.blocks, site.width),
                         enabled=lambda cfg: cfg.bitfit))
    yield
    TUNERS.unregister("toy_scale")


@pytest.fixture
def toy_loss():
    calls = []

    def build(cfg):
        def loss(embeddings, labels, proxy):  # cosine to the own class's proxy
            calls.append(proxy.proxies.shape)
            prx = torch.nn.functional.normalize(proxy.proxies, dim=-1)
            return (1 - (embeddings * prx[labels]).sum(-1)).mean()
        return loss

    LOSSES.register("toy_cosine", build)
    yield calls
    LOSSES.unregister("toy_cosine")


def test_a_registered_toy_tuner_and_loss_train(tiny_weights, tmp_path, toy_tuner, toy_loss):
    root = make_folder(tmp_path / "imgs", {f"c{i:02d}": 4 for i in range(8)})
    cfg = tiny_config(tiny_weights, **{"data.dataset": "folder", "data.root": str(root), "data.batch_size": 4,
                                       "data.batches_per_epoch": 2, "train.epochs": 1, "loss.name": "toy_cosine",
                                       "train.output_dir": str(tmp_path / "runs"), "train.run_name": "toy",
                                       "optim.lr": 0.05})
    trainer = Trainer(cfg, echo=lambda _: None)
    groups = trainer.model.trainable_groups()
    assert [n for n, _ in groups["toy_scale"]] == ["toy_scale.gains"]  # its own group, owned by its module
    assert "toy_scale" in format_parameter_report(trainer.model)
    gains = trainer.model.toy_scale.gains
    assert any(gains is p for g in trainer.optimizers[0].param_groups for p in g["params"])
    assert any(gains is p for p in trainer.model.backbone_parameters())  # touches the backbone (default)
    before = gains.detach().clone()
    result = trainer.fit()
    assert toy_loss and len(result.history) == 1
    assert not torch.equal(before, gains.detach())  # it trained
    assert "toy_scale.gains" in trainer.model.trainable_state()


def test_unknown_loss_names_the_registered_ones(tiny_weights):
    from promptdml.config import ConfigError

    with pytest.raises(ConfigError, match="norm_softmax"):
        tiny_config(tiny_weights, **{"loss.name": "proxy_anchr"})


def _model_and_batch(tiny_weights, **overrides):
    cfg = tiny_config(tiny_weights, **{"optim.lr": 0.05, **overrides})
    torch.manual_seed(0)
    model = create_model(cfg.model, 6).train()
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 3, 3, 5, 5])
    return cfg, model, torch.randn(6, 3, 32, 32, generator=g), labels


@pytest.mark.parametrize("bank", ["on", "off"])
def test_row_optimizer_is_unscaled_and_skipped_by_the_grad_scaler(tiny_weights, bank):
    cfg, model, images, labels = _model_and_batch(tiny_weights, **{"model.memory_bank": bank})
    trainer = Trainer(cfg, parts=TrainParts(cfg=cfg, model=model, loss_fn=build_loss(cfg.loss),
                                            optimizers=build_optimizers(model, cfg)))
    rows = trainer.optimizers[-1]
    assert isinstance(rows, LazyRowOptimizer) and isinstance(rows, torch.optim.Optimizer)
    table = model.class_prompts.table
    start = table.detach().clone()
    # loss scaling by 2**10: the rows' step equals the unscaled one (SGD's first step is lr * grad)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=True)
    seen = {}
    step = rows.step

    def spy(*args, **kwargs):
        seen["grad"] = model.class_prompts.placement.pending()[1].clone()
        return step(*args, **kwargs)

    rows.step = spy
    trainer.train_step(images, labels)
    assert trainer.skipped_steps == 0
    moved = (table.detach() - start).flatten(1).abs().amax(1)
    assert moved[[0, 3, 5]].min() > 0 and moved[[1, 2, 4]].max() == 0  # lazy: only the batch's rows
    assert torch.isfinite(seen["grad"]).all() and seen["grad"].abs().max() < 1e3  # unscaled before the step
    # an overflow in the class-prompt gradient alone: GradScaler skips that step and no container row is written
    container = model.proxies.container.clone()
    after_first = table.detach().clone()
    holder = model.class_prompts.placement.holder
    holder.register_hook(lambda g: g * float("inf"))
    trainer.train_step(images, labels)
    assert trainer.skipped_steps == 1
    assert torch.equal(table.detach(), after_first) and torch.equal(container, model.proxies.container)
    rows.zero_grad()  # the skipped step's rows are released by the next zero_grad
    assert model.class_prompts.placement.pending() is None and model.class_prompts.rows is None


def test_row_optimizer_schedules_clips_and_round_trips_state(tiny_weights):
    cfg, model, images, labels = _model_and_batch(tiny_weights, **{"optim.optimizer": "adamw",
                                                                    "model.memory_bank": "on"})
    optimizers = build_optimizers(model, cfg)
    rows = optimizers[-1]
    schedulers = build_schedulers(optimizers, cfg)
    trainer = Trainer(cfg, parts=TrainParts(cfg=cfg, model=model, loss_fn=build_loss(cfg.loss),
                                            optimizers=optimizers, schedulers=schedulers))
    assert any(t is model.class_prompts.placement.holder for t in trainer.clip)  # clipping sees the class-prompt gradient
    trainer.train_step(images, labels)
    for s in schedulers:
        s.step()
    assert rows.param_groups[0]["lr"] == optimizers[0].param_groups[0]["lr"]  # the same schedule, bit for bit
    assert rows.param_groups[0]["lr"] < cfg.optim.lr
    state = rows.state_dict()
    assert set(state["state"][0]) == {"exp_avg", "exp_avg_sq", "step"}
    fresh = LazyRowOptimizer([create_model(cfg.model, 6).class_prompts.placement], "adamw", lr=1.0)
    fresh.load_state_dict(state)
    holder = fresh.param_groups[0]["params"][0]
    assert all(v.device.type == "cpu" for v in fresh.state[holder].values())  # kept next to the CPU table
    assert fresh.state[holder]["step"].tolist() == [1, 0, 0, 1, 0, 1]
    assert fresh.param_groups[0]["lr"] == rows.param_groups[0]["lr"]


def test_proxy_loss_picks_the_proxies_by_range():
    torch.manual_seed(0)
    emb, labels = torch.randn(4, 8), torch.tensor([0, 0, 2, 2])
    proxies = torch.randn(3, 8)

    class Out:
        pass

    out = Out()
    out.proxies, out.batch_proxies, out.batch_classes = proxies, proxies[[0, 2]], torch.tensor([0, 2])
    base = ProxyAnchorLoss()
    assert torch.equal(ProxyLoss(base, "both_all")(emb, labels, out), base(emb, labels, proxies))
    assert torch.equal(ProxyLoss(base, "in_batch")(emb, labels, out), base(emb, labels, proxies[[0, 2]],
                                                                           torch.tensor([0, 2])))


@pytest.fixture
def toy_dataset():
    """A dataset format the package does not know: ``labels.tsv`` rows ``file<TAB>class<TAB>train|test``."""
    from promptdml.data.sources import Candidate, Listing
    from promptdml.registry import DATASETS, DatasetSpec, register_dataset

    def read(cfg, with_test, progress):
        root = Path(cfg.root)
        rows = [line.split("\t") for line in (root / "labels.tsv").read_text().splitlines() if line]
        return Listing([Candidate(str(root / f), c, s) for f, c, s in rows], str(root))

    register_dataset(DatasetSpec("toy_tsv", read, layout="<root>/labels.tsv + images", train_classes=3))
    yield
    DATASETS.unregister("toy_tsv")


def test_a_registered_toy_dataset_validates_builds_splits_and_shows_in_the_cli(tmp_path, toy_dataset, capsys):
    from data_fixtures import write_image

    from promptdml import cli
    from promptdml.config import describe_keys, load_config
    from promptdml.data import build_splits

    rows = []
    for c in range(5):
        for i in range(3):
            name = f"img_{c}_{i}.png"
            write_image(tmp_path / name, seed=10 * c + i)
            rows.append(f"{name}\tk{c}\t{'train' if c < 3 else 'test'}")
    (tmp_path / "labels.tsv").write_text("\n".join(rows) + "\n")
    cfg = load_config(None, {"data.dataset": "toy_tsv", "data.root": str(tmp_path)})
    splits = build_splits(cfg.data, check_images="exists")
    assert splits.name == "toy_tsv"
    assert splits.train.class_names == ["k0", "k1", "k2"] and len(splits.train) == 9
    assert splits.test.class_names == ["k3", "k4"] and len(splits.test) == 6
    assert cli._train_class_count(cfg) == 3  # from the spec, without reading the data
    assert "toy_tsv" in dict((k, h) for k, _, _, h in describe_keys())["data.dataset"]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["info", "--help"])
    assert "toy_tsv" in " ".join(capsys.readouterr().out.split())


def test_unknown_dataset_names_the_registered_ones(tmp_path):
    from promptdml.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="inaturalist"):
        load_config(None, {"data.dataset": "cub2000"})
