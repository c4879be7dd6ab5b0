"""CLI subcommands ``embed``, ``index build``, ``search`` and ``export``: ``register(subparsers)`` adds them.

Every handler takes the parsed arguments and returns an exit code; bad input raises
:class:`promptdml.retrieval.RetrievalError` (a ``ValueError``) or ``FileNotFoundError`` with a message
naming the file. Heavy imports happen inside the handlers so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from promptdml.retrieval import RetrievalError

MIN_OPSET, MAX_OPSET = 14, 23
"""ONNX opsets accepted by ``promptdml export --opset`` (the attention graph needs opset 14 or later)."""

__all__ = ["register", "cmd_embed", "cmd_index_build", "cmd_search", "cmd_export"]


def _err(*args: Any) -> None:
    print(*args, file=sys.stderr)


def _add_model_args(p: argparse.ArgumentParser, device: bool = True) -> None:
    p.add_argument("--run", required=True, help="run directory written by `promptdml train` (or its model.safetensors)")
    p.add_argument("--weights", help="backbone weights file to use instead of the one recorded in the run")
    if device:
        p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")


def _add_embed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision (default: the run's train.precision, as in its evaluation)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=int, default=0, help="image decoding worker processes (default 0: in process)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _load(args: argparse.Namespace):
    from promptdml.retrieval.embedder import load

    return load(args.run, device=getattr(args, "device", "cpu"), precision=getattr(args, "precision", None), weights=args.weights)


# ------------------------------------------------------------------------------------------------ embed
def _check_writable(out: Path) -> None:
    """Fail before any work when ``out`` cannot be written (read-only folder, a folder in its place, ...)."""
    from promptdml.errors import WriteError
    from promptdml.files import ensure_dir, os_reason

    if out.is_dir():
        raise WriteError(f"--out '{out}' is a folder; give a file name, e.g. {out / 'embeddings.safetensors'}")
    ensure_dir(out.parent)
    probe = out.with_name(out.name + ".tmp")
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise WriteError(f"cannot write '{out}': {os_reason(e)}. Choose a writable --out.") from None


def _save_keeping_work(out: Path, *args: Any, **kwargs: Any) -> list[Path]:
    """``save_embeddings``; if the write fails at the end, keep the work in the temp folder and say where."""
    import tempfile

    from promptdml.errors import WriteError
    from promptdml.retrieval.store import save_embeddings

    try:
        return save_embeddings(out, *args, **kwargs)
    except OSError as e:
        keep = Path(tempfile.gettempdir()) / f"promptdml-embed-{os.getpid()}{out.suffix}"
        try:
            save_embeddings(keep, *args, **kwargs)
        except OSError as e2:
            raise WriteError(f"{e}; keeping the embeddings in '{keep}' failed too ({e2})") from None
        raise WriteError(f"{e}. The embeddings are kept in '{keep}' (nothing is lost): move it into place, e.g. "
                         f"mv {keep} {out}") from None


def cmd_embed(args: argparse.Namespace) -> int:
    from promptdml.retrieval.embedder import list_images
    from promptdml.retrieval.store import _check_suffix, errors_file

    out = Path(args.out)
    _check_suffix(out)  # fail before loading the model
    _check_writable(out)
    paths = [os.path.abspath(p) for p in list_images(args.images)]  # stored absolute: usable from any folder
    if not paths:
        raise RetrievalError("no input images (give folders, image files or .txt lists of paths to --images)")
    embedder = _load(args)
    result = embedder.embed_files(paths, args.batch_size, progress=not args.no_progress, num_workers=args.workers)
    for path, reason in result.errors:
        _err(f"warning: skipped unreadable image {path}: {reason}")
    if not result.paths:
        raise RetrievalError(f"none of the {len(paths)} input images could be read (see the warnings above)")
    labels = [Path(p).parent.name for p in result.paths] if args.labels_from_folder else None
    written = _save_keeping_work(out, result.embeddings, result.paths, result.errors, embedder.describe(),
                                 labels=labels)
    print(f"embedded {len(result.paths)} images -> {result.embeddings.shape[0]} x {result.embeddings.shape[1]} "
          f"embeddings: {', '.join(str(w) for w in written)}")
    if result.errors:
        print(f"skipped {len(result.errors)} unreadable image(s); listed in {errors_file(out)}")
    return 0


# ------------------------------------------------------------------------------------------ index build
def cmd_index_build(args: argparse.Namespace) -> int:
    from promptdml.retrieval.index import build_index
    from promptdml.retrieval.store import load_embeddings

    data = load_embeddings(args.embeddings)
    info = {"embeddings_file": str(Path(args.embeddings).absolute()), "source": data.info}
    index = build_index(data.embeddings, data.paths, args.type, nlist=args.nlist, nprobe=args.nprobe, m=args.M,
                        ef_construction=args.ef_construction, ef_search=args.ef_search,
                        recall_queries=args.recall_queries, seed=args.seed, info=info, labels=data.labels,
                        progress=not args.no_progress)
    path = index.save(args.out)
    params = ", ".join(f"{k}={v}" for k, v in index.params.items())
    print(f"{index.kind} index of {len(index)} x {index.dim} embeddings{' (' + params + ')' if params else ''} "
          f"-> {path}")
    if "recall@10" in index.info:
        print(f"recall@10 vs exact search on {index.info['recall_queries']} sampled queries: "
              f"{index.info['recall@10']:.4f}")
    return 0


# ----------------------------------------------------------------------------------------------- search
def cmd_search(args: argparse.Namespace) -> int:
    from promptdml.retrieval.embedder import list_images
    from promptdml.retrieval.index import load_index
    from promptdml.retrieval.visualize import contact_sheet, sheet_name, write_html

    if args.k < 1:
        raise RetrievalError(f"-k must be >= 1, got {args.k}")
    if args.thumb_size < 16:
        raise RetrievalError(f"--thumb-size must be >= 16 pixels, got {args.thumb_size}")
    index = load_index(args.index)
    if args.k > len(index):
        _err(f"warning: -k {args.k} is more than the {len(index)} images in the index; returning {len(index)} per query")
    queries = [os.path.abspath(p) for p in list_images(args.query)]
    embedder = _load(args)
    if embedder.dim != index.dim:
        raise RetrievalError(f"the model makes {embedder.dim}-d embeddings but index '{args.index}' holds "
                             f"{index.dim}-d ones: search with the run the index was built from")
    built_with = (index.info.get("source") or {}).get("model_fingerprint")
    if built_with and embedder.fingerprint and built_with != embedder.fingerprint:
        _err(f"warning: index '{args.index}' was built from embeddings of another checkpoint "
             f"({(index.info.get('source') or {}).get('run')}); scores may be meaningless")
    result = embedder.embed_files(queries, args.batch_size, progress=not args.no_progress, num_workers=args.workers)
    for path, reason in result.errors:
        _err(f"warning: skipped unreadable query {path}: {reason}")
    results: list[dict[str, Any]] = []
    if result.paths:
        scores, ids = index.search(result.embeddings, args.k)
        for q, srow, irow in zip(result.paths, scores, ids, strict=True):
            nbs = [{"rank": r, "path": index.paths[i], "score": round(float(s), 6), "index": int(i)}
                   for r, (s, i) in enumerate(zip(srow, irow, strict=True), 1) if i >= 0]
            res: dict[str, Any] = {"query": q, "neighbors": nbs}
            query_label = Path(q).parent.name if args.labels_from_folder else None
            if query_label is not None:
                res["query_label"] = query_label
            if index.labels is not None:
                for nb in nbs:
                    nb["label"] = index.labels[nb["index"]]
                res["predicted_label"] = knn_vote([(nb["label"], nb["score"]) for nb in nbs])
            if query_label is not None:
                for nb in nbs:
                    nb["hit"] = nb.get("label", Path(nb["path"]).parent.name) == query_label
            results.append(res)
    report = {"index": str(args.index), "type": index.kind, "k": int(args.k), "results": results,
              "errors": [{"path": p, "reason": r} for p, r in result.errors]}
    if args.out:
        from promptdml.files import atomic_write_text, ensure_dir

        out = ensure_dir(Path(args.out), "--out folder")
        unreadable: list[str] = []
        for pos, res in enumerate(results):
            name = sheet_name(pos, res["query"])
            contact_sheet(res["query"], [(nb["path"], nb["score"], nb.get("label"), nb.get("hit"))
                                         for nb in res["neighbors"]],
                          out / "sheets" / name, thumb=args.thumb_size, query_label=res.get("query_label"),
                          unreadable=unreadable)
            res["sheet"] = f"sheets/{name}"
        atomic_write_text(out / "results.json", json.dumps(report, indent=2) + "\n")
        write_html(out, results, result.errors, title=f"promptdml search: {Path(args.index).name}")
        missing = sorted(set(unreadable))
        if missing:
            _err(f"warning: {len(missing)} image(s) shown in the results could not be read (drawn as 'unreadable'), "
                 f"e.g. {missing[0]}; the index stores absolute paths: were the images moved or deleted?")
        _err(f"results: {out / 'results.json'}, contact sheets: {out / 'sheets'}, page: {out / 'index.html'}")
    print(json.dumps(report, indent=2))
    if not result.paths:
        raise RetrievalError(f"none of the {len(queries)} query images could be read")
    return 0


def knn_vote(neighbours: list[tuple[str, float]]) -> str | None:
    """The class most frequent among the neighbours (ties: the larger summed score, then the better rank)."""
    if not neighbours:
        return None
    tally: dict[str, list[float]] = {}
    for rank, (label, score) in enumerate(neighbours):
        entry = tally.setdefault(label, [0, 0.0, -rank])
        entry[0] += 1
        entry[1] += score
    return max(tally, key=lambda c: tuple(tally[c]))


# ----------------------------------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    from promptdml.retrieval.export import export_onnx

    if args.format != "onnx":
        raise RetrievalError(f"unsupported export format {args.format!r} (supported: onnx)")
    out = Path(args.out)
    if out.suffix.lower() != ".onnx":
        raise RetrievalError(f"the ONNX output file must end with .onnx, got '{out}'")
    if args.opset is not None and not MIN_OPSET <= args.opset <= MAX_OPSET:
        raise RetrievalError(f"--opset {args.opset} is not supported; use {MIN_OPSET}..{MAX_OPSET} (or leave it out "
                             f"for the exporter's default)")
    _check_writable(out)
    embedder = _load(args)  # on the CPU, fp32 (the exported graph is fp32)
    res = export_onnx(embedder, out, opset=args.opset, check=not args.no_check, atol=args.atol,
                      progress=not args.no_progress)
    print(f"exported {res.path} (exporter: {res.exporter}, opset {res.opset}); input 'images' float32 "
          f"[N, 3, {embedder.img_size}, {embedder.img_size}], output 'embeddings' float32 [N, {embedder.dim}]")
    return 0


# ------------------------------------------------------------------------------------------------ parser
def register(subparsers) -> None:
    """Add ``embed``, ``index build``, ``search`` and ``export`` to an argparse ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "embed", help="embed images with a trained model and save embeddings + paths",
        description="Embed every image of the given folders / files / lists with a trained run. Output: "
                    "FILE.safetensors (tensor 'embeddings' [N,E] float32, metadata 'paths' = JSON list of the "
                    "N image paths, row i <-> paths[i]) or FILE.npy + FILE.txt (one path per line). Unreadable "
                    "images are skipped, reported on stderr and listed in FILE.errors.txt.",
        epilog="Example: promptdml embed --run runs/demo --images photos/ --out gallery.safetensors")
    _add_model_args(p)
    p.add_argument("--images", required=True, nargs="+", metavar="DIR_OR_LIST",
                   help="folders (searched recursively), image files, or .txt/.lst files with one path per line")
    p.add_argument("--out", required=True, help="output file: .safetensors or .npy")
    p.add_argument("--labels-from-folder", action="store_true",
                   help="store each image's parent folder name as its class label (then `search` predicts a "
                        "class by kNN vote)")
    _add_embed_args(p)
    p.set_defaults(func=cmd_embed)

    p = subparsers.add_parser("index", help="nearest-neighbour index tools (index build)",
                              description="Build indexes over embedding files.")
    index_sub = p.add_subparsers(dest="index_command", required=True, metavar="{build}")
    q = index_sub.add_parser(
        "build", help="build an exact or approximate (faiss) index from an embedding file",
        description="Build a cosine-similarity index from `promptdml embed` output. 'exact' (default) stores "
                    "the normalised embeddings and searches by brute-force inner product (ties: lower row "
                    "first). 'ivf' / 'hnsw' build approximate faiss indexes for large collections and report "
                    "their recall@10 against exact search on sampled queries (stored in the index).",
        epilog="Example: promptdml index build --embeddings gallery.safetensors --out gallery.index --type hnsw")
    q.add_argument("--embeddings", required=True, help="embedding file (.safetensors or .npy + .txt)")
    q.add_argument("--out", required=True, help="index file to write (one safetensors file)")
    q.add_argument("--type", default="exact", choices=["exact", "ivf", "hnsw"], help="index type (default exact)")
    q.add_argument("--nlist", type=int, help="ivf: number of inverted lists (default ~4*sqrt(N), >= 39 vectors/list)")
    q.add_argument("--nprobe", type=int, help="ivf: lists searched per query (default max(8, nlist/32))")
    q.add_argument("--M", type=int, default=32, help="hnsw: links per node (default 32)")
    q.add_argument("--ef-construction", type=int, default=200, help="hnsw: build beam width (default 200)")
    q.add_argument("--ef-search", type=int, default=64, help="hnsw: search beam width (default 64, at least k)")
    q.add_argument("--recall-queries", type=int, default=1000,
                   help="sampled queries for the recall@10 report of approximate indexes (default 1000)")
    q.add_argument("--seed", type=int, default=0, help="seed for k-means and the recall sample")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_index_build)

    p = subparsers.add_parser(
        "search", help="find the nearest gallery images of query images",
        description="Embed the query images with the run and print their k nearest neighbours in the index "
                    "with cosine scores as JSON. With --out DIR also write DIR/results.json, a contact sheet "
                    "per query (DIR/sheets/*.png: query, then neighbours with scores) and DIR/index.html.",
        epilog="Example: promptdml search --run runs/demo --index gallery.index --query q.jpg -k 10 --out res/")
    _add_model_args(p)
    p.add_argument("--index", required=True, help="index file from `promptdml index build`")
    p.add_argument("--query", required=True, nargs="+", metavar="IMG_OR_DIR",
                   help="query image files, folders or .txt lists of paths")
    p.add_argument("-k", type=int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--out", help="folder for results.json, contact sheets and index.html")
    p.add_argument("--thumb-size", type=int, default=160, help="contact sheet tile size in pixels (default 160)")
    p.add_argument("--labels-from-folder", action="store_true",
                   help="each query's class is its parent folder name: mark every neighbour as hit or miss")
    _add_embed_args(p)
    p.set_defaults(func=cmd_search)

    p = subparsers.add_parser(
        "export", help="export the embedding model (prompts + head baked in) to ONNX",
        description="Export the trained embedding model to ONNX: input 'images' float32 [N,3,S,S] "
                    "(preprocessed: resize, centre crop, normalise; recorded in the model metadata), output "
                    "'embeddings' [N,E] L2-normalised, dynamic batch axis. The export is checked against torch "
                    "with onnxruntime (max abs diff printed; fails above --atol). Needs: pip install "
                    "'promptdml[export]'.",
        epilog="Example: promptdml export --run runs/demo --format onnx --out demo.onnx")
    _add_model_args(p, device=False)
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format (default onnx)")
    p.add_argument("--out", required=True, help="output file (.onnx)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--atol", type=float, default=1e-4, help="parity tolerance (default 1e-4)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime parity check")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export)
