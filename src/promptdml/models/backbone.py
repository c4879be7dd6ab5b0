"""Frozen timm Vision Transformer backbones and the prompted forward pass.

``create_backbone`` builds any timm ``VisionTransformer`` (CLS token plus optional register or
distillation tokens) at the configured image size, with weights from the model hub or from a local
file, loaded through timm's own mechanism so position embeddings are resampled.
``PromptedViT`` runs the frozen blocks with a (possibly different) set of prompt tokens inserted after
the prefix tokens before each block and dropped after it (VPT-deep).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from promptdml.config import BackboneConfig
from promptdml.errors import BackboneError, CorruptFileError

log = logging.getLogger("promptdml")

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")
WEIGHTS_ENV = "PROMPTDML_WEIGHTS"




def _architecture(name: str) -> str:
    return name.split(".", 1)[0]


def resolve_weights_file(cfg: BackboneConfig) -> Path | None:
    """The local weights file to use, or None for the model hub.

    ``cfg.weights`` (or the ``PROMPTDML_WEIGHTS`` environment variable when it is empty) may be a file,
    or a folder searched for ``<architecture>*.{safetensors,pth,bin,npz}`` (e.g.
    ``vit_small_patch14_dinov2.lvd142m.safetensors``).
    """
    source = cfg.weights or os.environ.get(WEIGHTS_ENV, "")
    if not source:
        return None
    path = Path(source).expanduser()
    origin = "model.backbone.weights" if cfg.weights else f"${WEIGHTS_ENV}"
    if path.is_dir():
        arch = _architecture(cfg.name)
        found = sorted(p for p in path.iterdir()
                       if p.suffix in WEIGHT_SUFFIXES and (p.stem == arch or p.name.startswith(arch + ".")))
        if not found:
            if cfg.weights:
                raise BackboneError(
                    f"no weights for '{arch}' in folder {path} (from {origin}); expected a file named "
                    f"{arch}[.tag].safetensors (or .pth/.bin/.npz). Pass the file itself with --weights FILE.")
            return None  # a weights folder for other architectures: fall back to the hub
        return found[0]
    if not path.is_file():
        raise BackboneError(f"weights file '{path}' (from {origin}) does not exist. Pass an existing "
                            ".safetensors/.pth/.bin/.npz file with --weights FILE, or leave it empty to "
                            "download from the model hub.")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise BackboneError(f"weights file '{path}' has an unsupported suffix; use one of {WEIGHT_SUFFIXES}")
    return path


SUPPORTED_MODULES = ("timm.models.vision_transformer", "timm.models.deit")
SUPPORTED_FAMILIES = ("timm VisionTransformer models: vit_* (AugReg, DINOv2 vit_*_dinov2, CLIP, registers vit_*_reg*, "
                      "SigLIP ...), deit_* and deit3_* (timm.list_models('vit_*'))")


def check_architecture(name: str) -> None:
    """Refuse names timm does not know and models outside the supported ViT family, before building anything."""
    arch = _architecture(name)
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:5] if arch else []
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise BackboneError(f"timm does not know the model '{name}' (model.backbone.name).{hint} List names with "
                            f"timm.list_models('vit_*', pretrained=True).")
    module = timm.models.model_entrypoint(arch).__module__
    if module not in SUPPORTED_MODULES:
        raise BackboneError(f"model.backbone.name='{name}' is not a plain Vision Transformer (timm module "
                            f"'{module.rsplit('.', 1)[-1]}'); promptdml inserts "
                            f"prompt tokens into plain Vision Transformer blocks and supports only {SUPPORTED_FAMILIES}.")


def _check_weights_file(path: Path) -> None:
    """Cheap readability check of a local weights file: not empty, and a safetensors header that parses."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise BackboneError(f"cannot read weights file '{path}': {e.strerror or e}") from None
    if size == 0:
        raise CorruptFileError(f"weights file '{path}' is empty (0 bytes); download it again or pass another "
                               f"file with --weights FILE")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                if keys:  # reading the last tensor catches a file cut short
                    f.get_slice(keys[-1])[...]
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CorruptFileError(f"weights file '{path}' is not a readable safetensors file ({e}): truncated or "
                                   f"corrupt. Download it again or pass another file with --weights FILE.") from None


@contextlib.contextmanager
def _recording_loads(results: list[tuple[list[str], list[str]]]):
    """Record (missing, unexpected) keys of timm's pretrained-weights load (timm itself only logs them)."""
    import timm.models._builder as builder

    original = builder.load_pretrained

    def load_pretrained(model, *args, **kwargs):
        inner = model.load_state_dict

        def load_state_dict(state_dict, strict=True, *a, **kw):
            result = inner(state_dict, strict, *a, **kw)
            results.append((list(result.missing_keys), list(result.unexpected_keys)))
            return result

        model.load_state_dict = load_state_dict
        try:
            return original(model, *args, **kwargs)
        finally:
            del model.load_state_dict

    builder.load_pretrained = load_pretrained
    try:
        yield
    finally:
        builder.load_pretrained = original


def _listing(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def create_backbone(cfg: BackboneConfig) -> nn.Module:
    """A timm ViT with ``num_classes=0`` at ``cfg.img_size``, weights loaded, all parameters frozen.

    The weights must provide every tensor of the backbone (names and shapes): a file that lacks some is
    refused with the list of what is missing (and what it holds instead).
    """
    check_architecture(cfg.name)
    kwargs: dict = dict(num_classes=0, img_size=cfg.img_size)
    if cfg.depth:
        kwargs["depth"] = cfg.depth
    weights = resolve_weights_file(cfg) if cfg.pretrained else None
    if weights is not None:
        _check_weights_file(weights)
        overlay = dict(file=str(weights))
        if weights.suffix == ".npz":
            overlay["custom_load"] = True
        kwargs["pretrained_cfg_overlay"] = overlay
    loads: list[tuple[list[str], list[str]]] = []
    source = f"weights file '{weights}'" if weights is not None else f"the hub weights of '{cfg.name}'"
    try:
        with _recording_loads(loads):
            model = timm.create_model(cfg.name, pretrained=cfg.pretrained, **kwargs)
    except RuntimeError as e:  # state-dict mismatch raised by load_state_dict
        text = str(e)
        if weights is None:
            raise BackboneError(f"could not build '{cfg.name}': {text.splitlines()[0] if text else e}") from None
        if "size mismatch" not in text and "state_dict" not in text:
            raise CorruptFileError(f"could not read weights file '{weights}' ({text.splitlines()[0] if text else e}): "
                                   f"truncated or corrupt? Download it again or pass another file with "
                                   f"--weights FILE.") from None
        msg = text.strip().splitlines()
        detail = "\n  ".join(msg[:6]) + ("\n  ..." if len(msg) > 6 else "")
        raise BackboneError(
            f"weights file '{weights}' does not fit architecture '{cfg.name}':\n  {detail}\n"
            f"Pass weights of '{_architecture(cfg.name)}' or set model.backbone.name to the architecture the "
            "file was saved from.") from None
    except (OSError, ValueError, ImportError, EOFError, pickle.UnpicklingError) as e:
        if "Unknown model" in str(e) or "Invalid pretrained tag" in str(e):
            raise BackboneError(f"timm does not know the model '{cfg.name}': {e}. "
                                "List names with timm.list_models('vit_*', pretrained=True).") from None
        if weights is not None:
            raise CorruptFileError(f"could not read weights file '{weights}' ({type(e).__name__}: {e}): truncated "
                                   f"or corrupt? Download it again or pass another file with --weights FILE.") from None
        raise BackboneError(
            f"could not fetch pretrained weights for '{cfg.name}' from the model hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Offline? Pass a local weights file with "
            f"--weights FILE (or set model.backbone.weights, or ${WEIGHTS_ENV}=FILE_OR_FOLDER).") from None
    except Exception as e:  # hub client errors (connection, missing entry) have their own classes
        if weights is None and type(e).__module__.split(".")[0] in ("huggingface_hub", "requests", "urllib3"):
            raise BackboneError(
                f"could not fetch pretrained weights for '{cfg.name}' from the model hub ({type(e).__name__}). "
                f"Offline? Pass a local weights file with --weights FILE (or set model.backbone.weights, or "
                f"${WEIGHTS_ENV}=FILE_OR_FOLDER).") from None
        if weights is not None:
            raise CorruptFileError(f"could not read weights file '{weights}' ({type(e).__name__}: {e}): truncated "
                                   f"or corrupt? Download it again or pass another file with --weights FILE.") from None
        raise
    if cfg.pretrained and loads:
        missing, unexpected = loads[-1]
        if missing:
            extra = f" It holds {len(unexpected)} tensor(s) the model does not use: {_listing(unexpected)}." \
                if unexpected else ""
            raise BackboneError(
                f"{source}: {len(missing)} of the tensors that '{cfg.name}'"
                f"{f' (depth {cfg.depth})' if cfg.depth else ''} needs are missing: {_listing(missing)}.{extra} Training on it "
                f"would use a partly random backbone. Pass a complete weights file of '{_architecture(cfg.name)}' "
                f"(--weights FILE), or set model.backbone.name to the architecture the file was saved from.")
        if unexpected:
            log.warning("%s hold %d tensor(s) that '%s' does not use (ignored): %s", source, len(unexpected),
                        cfg.name, _listing(unexpected))
    for attr in ("patch_embed", "blocks", "_pos_embed", "norm", "num_prefix_tokens"):
        if not hasattr(model, attr):
            raise BackboneError(f"'{cfg.name}' is not a timm VisionTransformer (missing '{attr}'); "
                                f"promptdml supports {SUPPORTED_FAMILIES}.")
    model.requires_grad_(False)
    model.eval()
    return model


class PromptedViT(nn.Module):
    """Forward of a frozen timm ViT with per-block prompt tokens.

    ``forward(images, prompts)``: ``prompts[i]`` is ``None`` or a tensor ``[n_i, D]`` / ``[B, n_i, D]``
    inserted right after the prefix tokens (CLS, registers, distillation token) before block ``i`` and
    removed after it. Returns the pooled feature ``[B, D]`` after the final norm.
    """

    def __init__(self, vit: nn.Module, pool: str = "cls", grad_checkpointing: bool = False) -> None:
        super().__init__()
        self.vit = vit
        self.pool = pool
        self.grad_checkpointing = grad_checkpointing
        self.num_prefix_tokens: int = int(vit.num_prefix_tokens)
        self.embed_dim: int = int(vit.embed_dim)
        self.depth: int = len(vit.blocks)

    @property
    def feature_dim(self) -> int:
        return self.embed_dim * (2 if self.pool == "cls+avg" else 1)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit.patch_embed(images)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        return vit.norm_pre(x)

    def _block(self, i: int, x: torch.Tensor, prompt: torch.Tensor | None) -> torch.Tensor:
        block = self.vit.blocks[i]
        if prompt is None or prompt.shape[-2] == 0:
            return block(x)
        n, npt = prompt.shape[-2], self.num_prefix_tokens
        if prompt.dim() == 2:
            prompt = prompt.unsqueeze(0).expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :npt], prompt.to(x.dtype), x[:, npt:]], dim=1)
        x = block(x)
        return torch.cat([x[:, :npt], x[:, npt + n:]], dim=1)

    def forward(self, images: torch.Tensor, prompts: Sequence[torch.Tensor | None] = ()) -> torch.Tensor:
        x = self.tokens(images)
        for i in range(self.depth):
            p = prompts[i] if i < len(prompts) else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(self._block, i, x, p, use_reentrant=False)
            else:
                x = self._block(i, x, p)
        x = self.vit.norm(x)
        return self.pool_tokens(x)

    def pool_tokens(self, x: torch.Tensor) -> torch.Tensor:
        cls = x[:, 0]
        if self.pool == "cls":
            return cls
        avg = x[:, self.num_prefix_tokens:].mean(dim=1)
        return avg if self.pool == "avg" else torch.cat([cls, avg], dim=-1)

    def train(self, mode: bool = True) -> PromptedViT:
        """The frozen backbone always stays in eval mode (no dropout / drop-path)."""
        super().train(False)
        return self
