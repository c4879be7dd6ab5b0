"""Where the pretrained weights come from: one order, no network for local files, a fast offline error."""

from __future__ import annotations

import logging
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from promptdml.cli import main
from promptdml.config import BackboneConfig
from promptdml.models import BackboneError, create_backbone
from promptdml.models import backbone as bb

TINY = dict(name="vit_tiny_patch16_224", img_size=32, depth=2)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection or to use the hub client fails the test."""
    calls: list[str] = []

    def refuse(*args, **kwargs):
        calls.append(repr(args[:1]))
        raise AssertionError(f"network access attempted: {args[:1]}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    import huggingface_hub
    import timm.models._hub as timm_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(timm_hub, "hf_hub_download", refuse)
    bb._can_connect.cache_clear()
    yield calls
    bb._can_connect.cache_clear()


@pytest.fixture
def empty_hub_cache(monkeypatch, tmp_path):
    """A hub cache with nothing in it (huggingface_hub's and torch hub's)."""
    import huggingface_hub.constants as hub_constants
    import torch

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    monkeypatch.delenv(bb.WEIGHTS_ENV, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    return tmp_path / "hf_cache"


def _put_in_hub_cache(cache: Path, repo: str, weights: str) -> Path:
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abcd")
    snap = folder / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    shutil.copy(weights, snap / "model.safetensors")
    return snap / "model.safetensors"


def test_local_file_builds_without_any_network_access(tiny_weights, no_network, empty_hub_cache):
    vit = create_backbone(BackboneConfig(weights=tiny_weights, **TINY))
    assert vit.weights_source.path == Path(tiny_weights)
    assert vit.weights_source.origin == "model.backbone.weights"
    assert not no_network


def test_environment_variable_file_or_folder(tiny_weights, no_network, empty_hub_cache, monkeypatch):
    monkeypatch.setenv(bb.WEIGHTS_ENV, tiny_weights)
    assert bb.resolve_weights(BackboneConfig(**TINY)) == bb.WeightsSource(Path(tiny_weights), "$PROMPTDML_WEIGHTS")
    monkeypatch.setenv(bb.WEIGHTS_ENV, str(Path(tiny_weights).parent))  # a folder: <architecture>*.safetensors
    vit = create_backbone(BackboneConfig(**TINY))
    assert vit.weights_source.path == Path(tiny_weights)
    # the explicit setting wins over the environment
    other = Path(tiny_weights).parent / "copy" / "vit_tiny_patch16_224.other.safetensors"
    other.parent.mkdir(exist_ok=True)
    shutil.copy(tiny_weights, other)
    assert bb.resolve_weights(BackboneConfig(weights=str(other), **TINY)).path == other
    assert not no_network


def test_hub_cache_is_used_before_the_hub(tiny_weights, no_network, empty_hub_cache, monkeypatch, tmp_path):
    # an environment folder for other architectures falls through to the cache
    other = tmp_path / "other_weights"
    other.mkdir()
    (other / "vit_base_patch16_224.x.safetensors").write_bytes(b"")
    monkeypatch.setenv(bb.WEIGHTS_ENV, str(other))
    hub_id = bb._pretrained_cfg(TINY["name"]).hf_hub_id
    cached = _put_in_hub_cache(empty_hub_cache, hub_id, tiny_weights)
    vit = create_backbone(BackboneConfig(**TINY))
    assert vit.weights_source == bb.WeightsSource(cached, "hub cache")
    assert not no_network


def test_offline_error_names_the_three_routes_without_network(empty_hub_cache, no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError) as info:
        create_backbone(BackboneConfig(name="vit_small_patch14_dinov2.lvd142m", img_size=84))
    msg = str(info.value)
    assert "HF_HUB_OFFLINE" in msg and "--weights FILE" in msg and "PROMPTDML_WEIGHTS" in msg
    assert "hub cache" in msg and "getting-started.md" in msg
    assert not no_network  # HF_HUB_OFFLINE: not even a connection probe


def test_unreachable_hub_is_detected_by_one_bounded_probe(empty_hub_cache, monkeypatch):
    """No hub client call (no retries): one TCP probe, abandoned after HUB_PROBE_TIMEOUT_S."""
    release = threading.Event()
    probes: list[tuple] = []

    def hanging_connect(address, timeout=None, **kwargs):  # a resolver/firewall that never answers
        probes.append(address)
        release.wait(30)
        raise OSError("timed out")

    def refuse(*args, **kwargs):
        raise AssertionError("the hub client must not be called when the hub is unreachable")

    import timm.models._hub as timm_hub

    monkeypatch.setattr(socket, "create_connection", hanging_connect)
    monkeypatch.setattr(timm_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(bb, "HUB_PROBE_TIMEOUT_S", 0.5)
    bb._can_connect.cache_clear()
    try:
        start = time.monotonic()
        with pytest.raises(BackboneError, match="cannot be reached"):
            create_backbone(BackboneConfig(name="vit_small_patch14_dinov2.lvd142m", img_size=84))
        assert time.monotonic() - start < 10  # generous bound; the probe gives up after 0.5 s
        assert probes == [("huggingface.co", 443)]
    finally:
        release.set()
        bb._can_connect.cache_clear()


def test_demo_without_weights_fails_before_generating_data(empty_hub_cache, no_network, monkeypatch, tmp_path,
                                                           capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "demo_data"
    code = main(["demo", "--output-dir", str(tmp_path / "runs"), "--no-progress", "--set", f"data.root={data}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--weights FILE" in err and "PROMPTDML_WEIGHTS" in err and "hub cache" in err
    assert "Traceback" not in err
    assert not data.exists()  # failed before the data generation started


def test_each_hub_warning_is_printed_once(capsys):
    """The hub client prints its warnings with its own handler; the CLI's logging must not print them again."""
    import sys

    import huggingface_hub.utils.logging  # noqa: F401  (installs the hub's own stderr handler)

    from promptdml.cli import configure_logging

    root, hub = logging.getLogger(), logging.getLogger("huggingface_hub")
    assert hub.handlers, "huggingface_hub no longer installs its own handler: revisit configure_logging"
    saved_root, saved_streams = list(root.handlers), [h.setStream(sys.stderr) for h in hub.handlers]
    try:
        for h in list(root.handlers):  # as in a fresh interpreter: the CLI installs the root handler
            root.removeHandler(h)
        configure_logging(debug=False)
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        logging.getLogger("promptdml").warning("a promptdml warning")
        err = capsys.readouterr().err
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved_root:
            root.addHandler(h)
        for h, stream in zip(hub.handlers, saved_streams, strict=True):
            h.setStream(stream)
    assert err.count("Retrying in 1s [Retry 1/5].") == 1
    assert err.count("a promptdml warning") == 1
