"""ONNX export of the embedding model: parity with torch within 1e-4, dynamic batch axis, metadata."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pytest
import torch
from data_fixtures import write_image
from test_retrieval import make_run

import promptdml
from promptdml.retrieval import RetrievalError
from promptdml.retrieval.commands import register

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="promptdml")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_export_onnx_matches_torch(tiny_weights, tmp_path, capsys):
    from promptdml.retrieval.export import onnx_embed

    run, _ = make_run(tmp_path, tiny_weights)
    out = tmp_path / "model.onnx"
    assert cli(["export", "--run", str(run), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max abs diff" in printed and out.is_file()
    assert not list(tmp_path.glob("*.tmp*"))
    embedder = promptdml.load(run, device="cpu", precision="fp32")
    images = [write_image(tmp_path / "imgs" / f"{i}.png", size=(40 + i, 36)) for i in range(5)]
    x = torch.stack([embedder.preprocess(p) for p in images])
    ref = embedder.embed(images)
    for batch in (x[:1], x):  # dynamic batch axis
        got = onnx_embed(out, batch.numpy())
        assert got.shape == (batch.shape[0], 16)
        assert float(np.abs(got - ref[: batch.shape[0]]).max()) <= 1e-4
    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    prep = json.loads(meta["promptdml.preprocessing"])
    assert prep["img_size"] == 32 and len(prep["mean"]) == 3 and meta["promptdml.embed_dim"] == "16"
    assert [i.name for i in proto.graph.input] == ["images"]
    assert [o.name for o in proto.graph.output] == ["embeddings"]


def test_export_rejects_bad_output_and_failed_parity(tiny_weights, tmp_path):
    run, _ = make_run(tmp_path, tiny_weights)
    with pytest.raises(RetrievalError, match=".onnx"):
        cli(["export", "--run", str(run), "--out", str(tmp_path / "model.pt")])
    with pytest.raises(RetrievalError, match="parity"):  # an impossible tolerance: nothing is written
        cli(["export", "--run", str(run), "--out", str(tmp_path / "m.onnx"), "--atol", "-1"])
    assert not (tmp_path / "m.onnx").exists() and not list(tmp_path.glob("*.tmp*"))


def test_export_falls_back_to_torchscript_without_onnxscript(tiny_weights, tmp_path, monkeypatch):
    from promptdml.retrieval.export import export_onnx, onnx_embed

    run, _ = make_run(tmp_path, tiny_weights)
    embedder = promptdml.load(run, device="cpu", precision="fp32")
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript -> ImportError
    res = export_onnx(embedder, tmp_path / "legacy.onnx", echo=lambda s: None)
    assert res.exporter == "torchscript" and res.max_abs_diff is not None and res.max_abs_diff <= 1e-4
    x = torch.randn(4, 3, 32, 32)
    got = onnx_embed(res.path, x.numpy())
    assert float(np.abs(got - embedder.embed(x)).max()) <= 1e-4
