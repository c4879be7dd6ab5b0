"""Embed / index / search with a tiny saved model: API, file formats, CLI (via ``register``) and errors."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import torch
from conftest import tiny_config
from data_fixtures import write_garbage, write_image, write_truncated_jpeg
from PIL import Image

import promptdml
from promptdml.data import ImageRecords
from promptdml.engine import embed_records, save_checkpoint
from promptdml.models import create_model
from promptdml.retrieval import RetrievalError
from promptdml.retrieval.commands import register
from promptdml.retrieval.index import build_index, exact_search, load_index, neighbor_recall_at_k
from promptdml.retrieval.store import load_embeddings, save_embeddings


def make_run(root, weights) -> tuple:
    """A tiny model with non-trivial trainable weights saved like a training run."""
    cfg = tiny_config(weights)
    torch.manual_seed(0)
    model = create_model(cfg.model, 4)
    with torch.no_grad():
        for p in model.trainable_state().values():
            p.add_(0.05 * torch.randn_like(p))
    run = root / "run"
    save_checkpoint(model, cfg, run / "model.safetensors", class_names=list("abcd"))
    return run, cfg


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="promptdml")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def setup(tiny_weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    run, cfg = make_run(root, tiny_weights)
    imgs = root / "imgs"
    sizes = [(48, 40), (40, 48), (33, 33), (64, 30), (36, 52), (45, 45), (50, 38)]
    paths = [str(write_image(imgs / f"sub{i % 2}" / f"img_{i}.{'png' if i % 3 else 'jpg'}", size=s))
             for i, s in enumerate(sizes)]
    write_image(imgs / "sub0" / "gray.png", size=(40, 40), mode="L")
    write_image(imgs / "sub1" / "alpha.png", size=(40, 40), mode="RGBA")
    return {"root": root, "run": run, "cfg": cfg, "imgs": imgs, "paths": paths}


# ---------------------------------------------------------------------------------------------- embed
def test_load_embed_reproduces_evaluation_embeddings(setup):
    emb = promptdml.load(setup["run"], device="cpu")
    assert emb.dim == 16 and emb.img_size == 32
    from promptdml.engine.checkpoint import load_model

    model, cfg = load_model(setup["run"])
    folder_paths = sorted(str(p) for p in setup["imgs"].rglob("*.*"))
    records = ImageRecords(folder_paths, np.zeros(len(folder_paths), dtype=np.int64), ["x"])
    ref = embed_records(model, records, cfg, torch.device("cpu"), None).numpy()
    got = emb.embed(folder_paths, batch_size=4)
    assert got.dtype == np.float32 and got.shape == (len(folder_paths), 16)
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # a folder (sorted recursively), PIL images, a single path and a preprocessed tensor give the same rows
    np.testing.assert_allclose(emb.embed(setup["imgs"]), ref, atol=1e-6, rtol=0)
    pil = [Image.open(p) for p in folder_paths[:3]]
    np.testing.assert_allclose(emb.embed(pil), ref[:3], atol=1e-6, rtol=0)
    np.testing.assert_allclose(emb.embed(folder_paths[2]), ref[2:3], atol=1e-6, rtol=0)
    x = torch.stack([emb.preprocess(p) for p in folder_paths])
    np.testing.assert_allclose(emb.embed(x, batch_size=3), ref, atol=1e-6, rtol=0)
    # the evaluation's autocast precision is reproduced too
    bf = promptdml.Embedder(model, cfg, "cpu", precision="bf16")
    ref_bf = embed_records(model, records, cfg, torch.device("cpu"), torch.bfloat16).numpy()
    np.testing.assert_allclose(bf.embed(folder_paths), ref_bf, atol=1e-6, rtol=0)


def test_embed_bad_inputs(setup, tmp_path):
    emb = promptdml.load(setup["run"], device="cpu")
    bad = write_garbage(tmp_path / "bad.jpg")
    with pytest.raises(RetrievalError, match="bad.jpg"):
        emb.embed([setup["paths"][0], str(bad)])
    with pytest.raises(RetrievalError, match=r"\[N, 3, 32, 32\]"):
        emb.embed(torch.zeros(2, 3, 16, 16))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(RetrievalError, match="no image files"):
        emb.embed(tmp_path / "empty_dir")
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        emb.embed(tmp_path / "no_such_folder")
    with pytest.raises(FileNotFoundError):
        promptdml.load(tmp_path / "no_run")


@pytest.mark.parametrize("fmt", ["safetensors", "npy"])
def test_embed_cli_reports_unreadable_and_keeps_paths_aligned(setup, tmp_path, capsys, fmt):
    folder = tmp_path / "mixed"
    good = [write_image(folder / f"g{i}.png", size=(40, 36)) for i in range(4)]
    corrupt = write_garbage(folder / "c_corrupt.jpg")
    truncated = write_truncated_jpeg(folder / "e_truncated.jpg")
    missing = tmp_path / "missing.png"
    listing = tmp_path / "list.txt"
    listing.write_text(f"# extra inputs\n{missing}\n{good[0]}\n")
    out = tmp_path / f"emb.{fmt}"
    assert cli(["embed", "--run", str(setup["run"]), "--images", str(folder), str(listing), "--out", str(out),
                "--device", "cpu", "--batch-size", "3", "--no-progress"]) == 0
    captured = capsys.readouterr()
    for bad in (corrupt, truncated, missing):
        assert str(bad) in captured.err
    data = load_embeddings(out)
    assert data.paths == sorted(str(p) for p in good) + [str(good[0])]
    assert data.embeddings.shape == (5, 16)
    assert {p for p, _ in data.errors} == {str(corrupt), str(truncated), str(missing)}
    report = (tmp_path / f"emb.{fmt}.errors.txt").read_text()
    assert all(str(b) in report for b in (corrupt, truncated, missing))
    # every row is the embedding of the path stored for it
    np.testing.assert_allclose(data.embeddings, promptdml.load(setup["run"], "cpu").embed(data.paths),
                               atol=1e-6, rtol=0)
    if fmt == "npy":
        assert (tmp_path / "emb.txt").read_text().splitlines() == data.paths
    else:
        assert data.info["embed_dim"] == 16 and data.info["model_fingerprint"]


def test_embeddings_file_errors(tmp_path):
    with pytest.raises(RetrievalError, match=".safetensors"):
        save_embeddings(tmp_path / "e.csv", np.zeros((1, 2)), ["a"])
    with pytest.raises(RetrievalError, match="do not match"):
        save_embeddings(tmp_path / "e.npy", np.zeros((2, 2)), ["a"])
    with pytest.raises(FileNotFoundError):
        load_embeddings(tmp_path / "nope.safetensors")
    np.save(tmp_path / "x.npy", np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(FileNotFoundError, match="x.txt"):
        load_embeddings(tmp_path / "x.npy")


# ---------------------------------------------------------------------------------------------- index
def brute_force(q: np.ndarray, g: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = q @ g.T
    ids = np.stack([np.lexsort((np.arange(len(g)), -row))[:k] for row in s])
    return np.take_along_axis(s, ids, 1), ids


def test_exact_index_equals_brute_force_including_ties(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(60, 8)).astype(np.float32)
    gallery = np.concatenate([base, base[[3, 7, 7, 11]], base[:5]])  # exact duplicates -> tied scores
    perm = rng.permutation(len(gallery))
    gallery = gallery[perm]
    index = build_index(gallery, [f"img{i}.jpg" for i in range(len(gallery))])
    queries = np.concatenate([base[[3, 7, 0]], rng.normal(size=(10, 8)).astype(np.float32)])
    for k in (1, 5, 10, len(gallery), len(gallery) + 5):
        scores, ids = index.search(queries, k)
        q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        ref_scores, ref_ids = brute_force(q.astype(np.float32), index.embeddings, min(k, len(gallery)))
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-6)
    # a tied duplicate: the lower row comes first
    _, ids = index.search(base[7:8], 3)
    tied = sorted(np.flatnonzero(np.isin(perm, [7, 61, 62])).tolist())
    assert ids[0].tolist() == tied
    path = index.save(tmp_path / "g.index")
    again = load_index(path)
    assert again.kind == "exact" and again.paths == index.paths
    np.testing.assert_array_equal(again.search(queries, 7)[1], index.search(queries, 7)[1])
    with pytest.raises(RetrievalError, match="dimension"):
        index.search(np.ones((1, 5), dtype=np.float32), 3)


def clustered(n: int = 2000, d: int = 32, clusters: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, d))
    return x.astype(np.float32)


@pytest.mark.parametrize("kind,opts", [("ivf", {}), ("hnsw", {"m": 16})])
def test_approximate_index_reaches_reported_recall(tmp_path, kind, opts):
    pytest.importorskip("faiss")
    x = clustered()
    index = build_index(x, None, kind, recall_queries=500, **opts)
    reported = index.info["recall@10"]
    assert index.info["recall_queries"] == 500 and reported > 0.9
    path = index.save(tmp_path / f"{kind}.index")
    loaded = load_index(path)
    assert loaded.info["recall@10"] == reported and loaded.params == index.params
    # the reported recall holds on the collection: all 2000 vectors as queries
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    _, approx = loaded.search(xn, 10)
    _, exact = exact_search(xn, loaded.embeddings, 10)
    assert neighbor_recall_at_k(approx, exact, 10) >= reported - 0.02
    # and on fresh queries from the same distribution
    fresh = clustered(300, seed=1)
    _, approx = loaded.search(fresh, 10)
    _, exact = exact_search(fresh / np.linalg.norm(fresh, axis=1, keepdims=True), loaded.embeddings, 10)
    assert neighbor_recall_at_k(approx, exact, 10) >= reported - 0.05


def test_approximate_index_without_faiss(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    with pytest.raises(RetrievalError, match="faiss-cpu"):
        build_index(clustered(100), None, "hnsw")
    assert len(build_index(clustered(100), None, "exact")) == 100


# ------------------------------------------------------------------------------------------ CLI search
def test_cli_index_and_search(setup, tmp_path, capsys):
    run = str(setup["run"])
    emb_file = tmp_path / "gallery.safetensors"
    assert cli(["embed", "--run", run, "--images", str(setup["imgs"]), "--out", str(emb_file), "--device", "cpu",
                "--no-progress"]) == 0
    index_file = tmp_path / "gallery.index"
    assert cli(["index", "build", "--embeddings", str(emb_file), "--out", str(index_file)]) == 0
    capsys.readouterr()
    queries = [setup["paths"][0], setup["paths"][3]]
    out = tmp_path / "res"
    assert cli(["search", "--run", run, "--index", str(index_file), "--query", *queries, "-k", "4",
                "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["query"] for r in report["results"]] == queries
    for res in report["results"]:
        nbs = res["neighbors"]
        assert len(nbs) == 4 and [n["rank"] for n in nbs] == [1, 2, 3, 4]
        assert nbs[0]["path"] == res["query"] and nbs[0]["score"] == pytest.approx(1.0, abs=1e-5)
        assert all(a["score"] >= b["score"] for a, b in zip(nbs, nbs[1:], strict=False))
    saved = json.loads((out / "results.json").read_text())
    assert [r["neighbors"] for r in saved["results"]] == [r["neighbors"] for r in report["results"]]
    sheets = sorted((out / "sheets").glob("*.png"))
    assert len(sheets) == 2
    with Image.open(sheets[0]) as im:
        assert im.width > 5 * 160
    page = (out / "index.html").read_text()
    links = re.findall(r"(?:href|src)='([^']+)'", page)
    assert "sheets/query_0000_img_0.png" in links and len(links) > 10
    for link in links:  # the page carries its thumbnails; sheets are relative, originals absolute file links
        if link.startswith("data:image/jpeg;base64,"):
            continue
        if link.startswith("file:"):
            assert Path(unquote(urlparse(link).path)).is_file(), link
            continue
        assert not link.startswith("/"), link
        assert (out / unquote(link)).is_file(), link
    assert page.count("data:image/jpeg;base64,") == 2 * (1 + 4)  # every tile embedded: moving the page keeps them


def test_cli_help_and_errors(setup, tmp_path, capsys):
    for argv in (["embed", "--help"], ["index", "build", "--help"], ["search", "--help"], ["export", "--help"]):
        with pytest.raises(SystemExit) as e:
            cli(argv)
        assert e.value.code == 0
        assert "usage" in capsys.readouterr().out
    with pytest.raises(RetrievalError, match=".npy"):
        cli(["embed", "--run", str(setup["run"]), "--images", str(setup["imgs"]), "--out", str(tmp_path / "e.csv")])
    with pytest.raises(FileNotFoundError, match="promptdml embed"):
        cli(["index", "build", "--embeddings", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "i")])
    # an index of other-dimensional embeddings cannot be searched with this model
    build_index(np.eye(3, 8, dtype=np.float32), ["a", "b", "c"]).save(tmp_path / "other.index")
    with pytest.raises(RetrievalError, match="8-d"):
        cli(["search", "--run", str(setup["run"]), "--index", str(tmp_path / "other.index"), "--query",
             setup["paths"][0], "--device", "cpu", "--no-progress"])
    with pytest.raises(RetrievalError, match="not a promptdml index"):
        save_embeddings(tmp_path / "e.safetensors", np.eye(2, dtype=np.float32), ["a", "b"])
        load_index(tmp_path / "e.safetensors")


def test_inference_code_imports_nothing_from_the_engine():
    """retrieval/ (what promptdml.load returns) and the modules it shares with training stand apart from engine/."""
    import ast

    import promptdml

    pkg = Path(promptdml.__file__).parent
    files = [*sorted((pkg / "retrieval").glob("*.py")), pkg / "embedding.py", pkg / "device.py", pkg / "checkpoint.py"]
    bad = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{f.name}: {n}" for n in names if n.startswith("promptdml.engine")]
    assert not bad
