"""Export the embedding model (backbone + shared prompts + BitFit biases + head, all baked in) to ONNX.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (the ``torch.export``-based exporter, the default since
PyTorch 2.9; needs ``onnxscript``), which works offline and gives a graph with a symbolic batch axis.
If onnxscript is missing we fall back to the legacy TorchScript exporter (``dynamo=False``, deprecated
in PyTorch >= 2.9 but still present) with ``dynamic_axes``. Either way the result is checked against
the torch model with onnxruntime before it is written to its final path.

Graph: input ``images`` float32 ``[N, 3, S, S]`` (preprocessed exactly like :meth:`Embedder.preprocess`:
see the model's ``promptdml.preprocessing`` metadata), output ``embeddings`` float32 ``[N, E]``,
L2-normalised.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from promptdml.extras import require
from promptdml.files import atomic_write
from promptdml.progress import progress_bar
from promptdml.retrieval import RetrievalError
from promptdml.retrieval.embedder import Embedder

__all__ = ["ExportResult", "export_onnx", "onnx_embed"]


@dataclass
class ExportResult:
    path: Path
    exporter: str
    """``dynamo`` or ``torchscript``"""
    max_abs_diff: float | None
    """max |onnxruntime - torch| on a random batch; None when the check was skipped"""
    opset: int | None


class _EmbeddingGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def _require(module: str, what: str):
    return require(module, what, "export", error=RetrievalError)


def onnx_embed(path: str | os.PathLike, images: np.ndarray) -> np.ndarray:
    """Run an exported model with onnxruntime on preprocessed images ``[N, 3, S, S]``."""
    ort = _require("onnxruntime", "running an ONNX model")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {"images": np.ascontiguousarray(images, dtype=np.float32)})[0]


def _export(graph: nn.Module, example: torch.Tensor, path: Path, opset: int | None) -> str:
    """Export with the dynamo exporter, falling back to TorchScript without onnxscript; returns which."""
    log = io.StringIO()
    try:
        import onnxscript  # noqa: F401 - required by the dynamo exporter
    except ImportError:
        pass
    else:
        batch = torch.export.Dim("batch", min=1)
        kwargs = {"opset_version": opset} if opset else {}
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, (example,), str(path), input_names=["images"], output_names=["embeddings"],
                              dynamic_shapes=({0: batch},), dynamo=True, external_data=False, optimize=True,
                              verbose=False, **kwargs)
        return "dynamo"
    with contextlib.redirect_stdout(log), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (example,), str(path), input_names=["images"], output_names=["embeddings"],
                          dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
                          opset_version=opset or 17, dynamo=False)
    return "torchscript"


def export_onnx(embedder: Embedder, out: str | os.PathLike, opset: int | None = None, check: bool = True,
                atol: float = 1e-4, check_batch: int = 3, echo=print, progress: bool = False) -> ExportResult:
    """Write ``embedder``'s model as ONNX to ``out`` (temp file first; moved into place only if it passes).

    ``check``: compare onnxruntime with torch (fp32) on a random batch of ``check_batch`` images (a batch
    size different from the one traced, so the dynamic batch axis is exercised); raise
    :class:`RetrievalError` if the max abs difference exceeds ``atol``. ``progress``: a progress bar over the
    stages (tracing and export, metadata, parity check; tens of seconds for a ViT-S on a CPU).
    """
    onnx = _require("onnx", "ONNX export")
    if check:
        _require("onnxruntime", "the ONNX parity check (or pass check=False / --no-check)")
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise RetrievalError(f"the ONNX output file must end with .onnx, got '{out}'")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = embedder.model
    original_device = next(model.parameters()).device
    model.cpu().eval()
    graph = _EmbeddingGraph(model).eval()
    s = embedder.img_size
    gen = torch.Generator().manual_seed(0)
    bar = progress_bar(total=2 + bool(check), desc="export onnx", unit="stage", enabled=progress)
    exporter, diff, opset_used = "", None, None

    def write(tmp: Path) -> None:
        nonlocal exporter, diff, opset_used
        bar.set_postfix_str("tracing and exporting")
        try:
            exporter = _export(graph, torch.randn(2, 3, s, s, generator=gen), tmp, opset)
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - the exporters raise many types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RetrievalError(f"ONNX export failed{f' with opset {opset}' if opset else ''}: {first}. Try another "
                                 f"--opset (e.g. 18) or leave it out; nothing was written to '{out}'") from None
        bar.update(1)
        bar.set_postfix_str("metadata")
        proto = onnx.load(str(tmp))
        opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        meta = {"promptdml.preprocessing": json.dumps(embedder.preprocessing()),
                "promptdml.embed_dim": str(embedder.dim), "promptdml.backbone": embedder.cfg.model.backbone.name,
                "promptdml.run": str(embedder.source or ""), "promptdml.exporter": exporter}
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(tmp))
        bar.update(1)
        if check:
            bar.set_postfix_str("parity check (onnxruntime)")
            x = torch.randn(check_batch, 3, s, s, generator=gen)
            with torch.no_grad():
                ref = model(x).float().numpy()
            got = onnx_embed(tmp, x.numpy())
            if got.shape != ref.shape:
                raise RetrievalError(f"ONNX output shape {got.shape} != torch {ref.shape}")
            diff = float(np.abs(got - ref).max())
            bar.update(1)
            echo(f"parity check (onnxruntime vs torch, batch {check_batch}): max abs diff {diff:.3e} "
                 f"(tolerance {atol:g})")
            if not diff <= atol:
                raise RetrievalError(f"ONNX export failed the parity check: max abs diff {diff:.3e} > {atol:g}; "
                                     f"nothing was written to '{out}'")

    try:  # the exporters need a file name ending in .onnx
        atomic_write(out, write, fsync=False, tmp_name=out.stem + ".tmp.onnx")
    finally:
        bar.close()
        model.to(original_device)
    return ExportResult(out, exporter, diff, opset_used)
