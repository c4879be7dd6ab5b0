"""Distributed (torchrun-style) training on CPU with gloo: 2 processes equal 1 process.

Each test starts 2 worker processes of this very file (``python tests/test_distributed.py SPEC``) with the
environment torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, a free MASTER_PORT)
and compares what they write with a single-process run in the test process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
WORLD = 2


# ------------------------------------------------------------------------------------------------ worker side
def _config(spec: dict):
    from conftest import tiny_config

    return tiny_config(spec["weights"], **spec["overrides"])


def _row_opt_state(trainer) -> dict:
    """The class-prompt table's optimiser state by name (empty without the semantic branch)."""
    if len(trainer.optimizers) < 3:
        return {}
    rows = trainer.optimizers[2]
    return dict(rows.state.get(trainer.model.class_prompts.placement.holder, {}))


def _snapshot(trainer) -> dict:
    model = trainer.model
    return {"state": {k: v.detach().cpu().clone() for k, v in model.trainable_state().items()},
            "row_opt": {k: v.cpu().clone() for k, v in _row_opt_state(trainer).items()},
            "history": trainer.history, "global_step": trainer.global_step,
            "traffic": trainer.dist.traffic.as_dict()}


def _worker(spec: dict) -> None:
    torch.set_num_threads(1)
    from promptdml.engine import Trainer

    rank = int(os.environ.get("RANK", "0"))
    out = Path(spec["out"])
    trainer = None
    for job in spec["jobs"]:
        cfg = _config({"weights": spec["weights"], "overrides": job["overrides"]})
        kind = job["kind"]
        if kind == "resume":
            trainer = Trainer(cfg, run_dir=Path(job["run_dir"]), resume=True)
        else:
            trainer = Trainer(cfg)
        if kind == "steps":  # one epoch of batches_per_epoch steps, no evaluation / files beyond config
            trainer._train_epoch()
        elif kind == "epoch":  # one epoch with its end (log, state), then the process "stops"
            trainer._end_epoch(trainer._train_epoch())
        elif kind in ("fit", "resume"):
            trainer.fit()
        elif kind == "eval":
            from promptdml.engine.evaluator import embed_records

            metrics = trainer.evaluate("test")
            emb = embed_records(trainer.model, trainer.splits.test, cfg, trainer.device, trainer.dtype,
                                dist=trainer.dist)
            torch.save({"metrics": metrics, "emb": emb}, out / f"{job['name']}_rank{rank}.pt")
            continue
        torch.save(_snapshot(trainer), out / f"{job['name']}_rank{rank}.pt")
    if trainer is not None:
        trainer.close()


# ------------------------------------------------------------------------------------------------ test side
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path: Path, weights: str, jobs: list[dict], timeout: float = 240) -> list[str]:
    """Run ``jobs`` in WORLD processes (gloo on 127.0.0.1); returns each rank's stdout+stderr."""
    out = tmp_path / "dist_out"
    out.mkdir(exist_ok=True)
    spec = tmp_path / f"spec_{len(list(tmp_path.glob('spec_*.json')))}.json"
    spec.write_text(json.dumps({"weights": weights, "out": str(out), "jobs": jobs}))
    port = _free_port()
    src = str(HERE.parent / "src")
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
               "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
               "PYTHONPATH": os.pathsep.join([src, str(HERE), os.environ.get("PYTHONPATH", "")])}
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(spec)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, text) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"rank {rank} failed:\n{text[-4000:]}"
    return logs


def _load(tmp_path: Path, name: str) -> list[dict]:
    return [torch.load(tmp_path / "dist_out" / f"{name}_rank{r}.pt", weights_only=False) for r in range(WORLD)]


if __name__ == "__main__":
    _worker(json.loads(Path(sys.argv[1]).read_text()))
    sys.exit(0)


# ------------------------------------------------------------------------------------------------ tests
import pytest  # noqa: E402
from conftest import tiny_config  # noqa: E402

from promptdml.engine import Trainer  # noqa: E402
from promptdml.engine.state import LAST, RESUME_DIR  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_process_env")


def _overrides(root, out, **extra) -> dict:
    o = {"data.dataset": "folder", "data.root": str(root), "data.batch_size": 8, "data.samples_per_class": 2,
         "data.batches_per_epoch": 3, "train.epochs": 1, "train.output_dir": str(out), "train.run_name": "r",
         "optim.lr": 0.05, "optim.optimizer": "adamw", "optim.weight_decay": 1e-2, "eval.batch_size": 5}
    o.update(extra)
    return o


def _assert_same(a: dict, b: dict, atol: float = 1e-5, noisy: float = 0.0) -> None:
    """Every tensor equal within ``atol``; with ``noisy`` > 0 up to that fraction of a tensor's elements may
    instead differ by at most 1e-3 (AdamW: a coordinate whose true gradient nearly cancels gets a
    summation-order-dependent sign, and Adam turns it into an lr-sized step; a real defect, such as a row
    gradient that did not travel, moves whole rows by ~lr = 0.05)."""
    assert set(a) == set(b) and a
    for key in a:
        if not noisy:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
            continue
        diff = (a[key].double() - b[key].double()).abs()
        off = int((diff > atol).sum())
        assert off <= noisy * diff.numel(), f"{key}: {off} of {diff.numel()} elements differ by more than {atol}"
        assert diff.numel() == 0 or float(diff.max()) <= 1e-3, f"{key}: max difference {float(diff.max())}"


# AdamW runs without BitFit: the attention *key* bias has an exactly-zero true gradient (softmax is shift
# invariant), so its gradient is rounding noise whose value depends on the summation order, and AdamW turns
# any noise into lr-sized steps. SGD (momentum) keeps it at noise level, so BitFit is compared with SGD.
@pytest.mark.parametrize("bank,extra", [
    ("on", {"optim.optimizer": "sgd"}),
    ("off", {"optim.optimizer": "sgd", "optim.grad_clip": 0.5, "loss.proxy_range": "in_batch"}),
    ("on", {"model.bitfit": False}),
])
def test_two_processes_equal_one_process(tiny_weights, seeded_data_root, tmp_path, bank, extra):
    o = _overrides(seeded_data_root, tmp_path / "runs", **{"model.memory_bank": bank, **extra})
    launch(tmp_path, tiny_weights, [{"kind": "steps", "name": "steps", "overrides": o}])
    ranks = _load(tmp_path, "steps")

    torch.set_num_threads(1)
    single = Trainer(tiny_config(tiny_weights, **{**o, "train.run_name": "single"}), echo=lambda _: None)
    assert single.model.memory_bank == (bank == "on")
    single._train_epoch()
    ref = {k: v.detach().cpu() for k, v in single.model.trainable_state().items()}
    ref_opt = _row_opt_state(single)
    assert ranks[0]["global_step"] == single.global_step == 3
    assert "class_prompts.table" in ref and "proxies.container" in ref
    noisy = 1e-3 if o["optim.optimizer"] == "adamw" else 0.0
    for r in ranks:  # every rank holds the single-process weights, class prompts, container and row-opt state
        _assert_same(r["state"], ref, noisy=noisy)
        _assert_same(r["row_opt"], {k: v.cpu() for k, v in ref_opt.items()}, noisy=noisy)
    # the ranks are replicas of each other bit for bit
    for key in ranks[0]["state"]:
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
    # only the batch's class-prompt rows travelled: 3 steps x (B/k classes x T x D x 4 bytes) received in total
    t = ranks[0]["traffic"]
    table = ref["class_prompts.table"]
    row_bytes = table[0].numel() * 4
    assert t["class_prompts/grads"]["calls"] == 3
    assert t["class_prompts/grads"]["sent"] + t["class_prompts/grads"]["received"] == 3 * 4 * row_bytes


def test_checkpoint_by_rank0_and_resume_continues_identically(tiny_weights, seeded_data_root, tmp_path):
    o = _overrides(seeded_data_root, tmp_path / "runs", **{"train.epochs": 2, "model.memory_bank": "on"})
    straight = {**o, "train.run_name": "straight"}
    logs = launch(tmp_path, tiny_weights, [{"kind": "fit", "name": "straight", "overrides": straight},
                                           {"kind": "epoch", "name": "half", "overrides": o}])
    assert "epoch 1/2" in logs[0] and "epoch" not in logs[1]  # rank 1 prints nothing
    run = tmp_path / "runs" / "straight"
    names = {p.name for p in run.iterdir()} - {"tensorboard"}
    assert names == {"config.yaml", "log.csv", "training.png", "checkpoints", "model.safetensors", "metrics.json",
                     "README.md"}
    if (run / "tensorboard").exists():  # one writer: rank 0
        assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    saved = sorted(p.name for p in (run / RESUME_DIR).iterdir())
    assert LAST in saved and not [n for n in saved if n.endswith(".tmp")]
    assert len((run / "log.csv").read_text().strip().splitlines()) == 3  # header + 2 epochs, written once
    assert json.loads((run / "metrics.json").read_text())["world_size"] == WORLD
    half = tmp_path / "runs" / "r"
    assert torch.load(half / RESUME_DIR / LAST, weights_only=False)["epoch"] == 1

    launch(tmp_path, tiny_weights, [{"kind": "resume", "name": "resumed", "overrides": o, "run_dir": str(half)}])
    a, b = _load(tmp_path, "straight"), _load(tmp_path, "resumed")
    for r in range(WORLD):
        for key in a[r]["state"]:
            assert torch.equal(a[r]["state"][key], b[r]["state"][key]), key
        assert [h["loss"] for h in a[r]["history"]] == [h["loss"] for h in b[r]["history"]]
        assert b[r]["global_step"] == 6


def test_distributed_evaluation_equals_single_process(tiny_weights, seeded_data_root, tmp_path):
    o = _overrides(seeded_data_root, tmp_path / "runs")
    launch(tmp_path, tiny_weights, [{"kind": "eval", "name": "eval", "overrides": o}])
    ranks = _load(tmp_path, "eval")
    torch.set_num_threads(1)
    single = Trainer(tiny_config(tiny_weights, **{**o, "train.run_name": "single"}), echo=lambda _: None)
    ref = single.evaluate("test")
    from promptdml.engine.evaluator import embed_records

    emb = embed_records(single.model, single.splits.test, single.cfg, single.device, single.dtype)
    assert len(single.splits.test) % 5 != 0  # a partial last batch, uneven shards
    for r in ranks:
        assert r["metrics"].keys() == ref.keys()
        for key in ref:
            assert r["metrics"][key] == pytest.approx(ref[key], abs=1e-6), key
        torch.testing.assert_close(r["emb"], emb, atol=1e-6, rtol=0)
