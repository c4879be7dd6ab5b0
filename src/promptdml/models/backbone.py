"""Frozen timm Vision Transformer backbones and the prompted forward pass.

``create_backbone`` builds any timm ``VisionTransformer`` (CLS token plus optional register or
distillation tokens) at the configured image size, with weights from the model hub or from a local
file, loaded through timm's own mechanism so position embeddings are resampled.
``PromptedViT`` runs the frozen blocks with a (possibly different) set of prompt tokens inserted after
the prefix tokens before each block and dropped after it (VPT-deep).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pickle
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.attention import Attention as _TimmAttention
from timm.models.vision_transformer import Block as _TimmBlock
from torch.utils.checkpoint import checkpoint

from promptdml.config import BackboneConfig
from promptdml.errors import BackboneError, CorruptFileError

log = logging.getLogger("promptdml")

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")
WEIGHTS_ENV = "PROMPTDML_WEIGHTS"
HUB_PROBE_TIMEOUT_S = 3.0
"""Seconds to wait for a TCP connection to the model hub before calling it unreachable."""
WEIGHTS_DOCS = "docs/getting-started.md#pretrained-weights-offline"



def _compiler_errors() -> tuple[type[BaseException], ...]:
    """Exceptions by which torch.compile reports that it could not compile (not errors of the model)."""
    errors: list[type[BaseException]] = []
    try:
        from torch._dynamo.exc import BackendCompilerFailed

        errors.append(BackendCompilerFailed)
    except ImportError:
        pass
    try:
        from torch._inductor.exc import CppCompileError, InvalidCxxCompiler

        errors += [CppCompileError, InvalidCxxCompiler]
    except ImportError:
        pass
    return tuple(errors) or (RuntimeError,)


_COMPILER_ERRORS = _compiler_errors()


def _hooked(module: nn.Module, fn, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` with ``module``'s own forward pre-hooks and forward hooks applied around it, as
    ``module(x)`` would (for a module whose forward :class:`PromptedViT` re-implements)."""
    for hook in module._forward_pre_hooks.values():
        result = hook(module, (x,))
        if result is not None:
            x = result[0] if isinstance(result, tuple) else result
    out = fn(x)
    for hook in module._forward_hooks.values():
        result = hook(module, (x,), out)
        if result is not None:
            out = result
    return out


def _architecture(name: str) -> str:
    return name.split(".", 1)[0]


@dataclass(frozen=True)
class WeightsSource:
    """Where the backbone's pretrained weights come from: a local file, or (``path=None``) a hub download."""

    path: Path | None
    origin: str
    """``model.backbone.weights``, ``$PROMPTDML_WEIGHTS``, ``hub cache`` or ``hub``."""

    def describe(self) -> str:
        if self.path is None:
            return "the model hub (downloaded by timm)"
        return f"local file {self.path} (from {self.origin})"


def resolve_weights(cfg: BackboneConfig, check_hub: bool = True) -> WeightsSource:
    """The one place that decides where the pretrained weights of ``cfg.name`` come from, in this order:

    1. ``cfg.weights`` (``--weights``): a file, or a folder searched for ``<architecture>[.tag].<suffix>``;
    2. ``$PROMPTDML_WEIGHTS``: the same, but a folder without a matching file falls through;
    3. the hub cache (``huggingface_hub``'s cache, then torch hub's ``checkpoints/``): a file downloaded before;
    4. the model hub, only when it answers (``HF_HUB_OFFLINE`` unset, a TCP connection within
       :data:`HUB_PROBE_TIMEOUT_S` seconds); otherwise a :class:`BackboneError` naming the three offline routes.

    A local file (routes 1-3) means timm reads that file and makes no network access.
    """
    if cfg.weights:
        found = _local_weights(cfg.weights, cfg.name, "model.backbone.weights / --weights", strict=True)
        assert found is not None
        return WeightsSource(found, "model.backbone.weights")
    env = os.environ.get(WEIGHTS_ENV, "").strip()
    if env:
        found = _local_weights(env, cfg.name, f"${WEIGHTS_ENV}", strict=False)
        if found is not None:
            return WeightsSource(found, f"${WEIGHTS_ENV}")
    pretrained = _pretrained_cfg(cfg.name)
    if pretrained is None:  # unknown to timm: create_model reports it with the list of names
        return WeightsSource(None, "hub")
    cached = hub_cache_file(pretrained)
    if cached is not None:
        return WeightsSource(cached, "hub cache")
    if check_hub:
        reason = hub_unreachable_reason(pretrained)
        if reason:
            skipped = f" ${WEIGHTS_ENV}={env} holds no file for '{_architecture(cfg.name)}'." if env else ""
            raise BackboneError(no_weights_message(cfg.name, reason + "." + skipped))
    return WeightsSource(None, "hub")


def resolve_weights_file(cfg: BackboneConfig) -> Path | None:
    """The local weights file :func:`resolve_weights` picks, or None for a hub download (no hub check)."""
    return resolve_weights(cfg, check_hub=False).path


def no_weights_message(name: str, reason: str) -> str:
    """The error for "no pretrained weights": why, and the three ways to provide them."""
    arch = _architecture(name)
    return (
        f"no pretrained weights for '{name}': {reason} Provide them in one of three ways:\n"
        f"  1. --weights FILE (or model.backbone.weights in the config): a local .safetensors/.pth/.bin/.npz "
        f"file of {arch};\n"
        f"  2. export {WEIGHTS_ENV}=FILE_OR_FOLDER (a folder is searched for {arch}*.safetensors and the like);\n"
        f"  3. the hub cache: run the same command once on a machine with internet access and copy its "
        f"~/.cache/huggingface/hub (or point HF_HUB_CACHE at a copy); HF_HUB_OFFLINE=1 then skips the network.\n"
        f"Details: {WEIGHTS_DOCS}")


def _local_weights(source: str, name: str, origin: str, strict: bool) -> Path | None:
    """A weights file given as a file or a folder. ``strict``: a folder without a match is an error."""
    path = Path(source).expanduser()
    arch = _architecture(name)
    if path.is_dir():
        found = sorted(p for p in path.iterdir()
                       if p.suffix in WEIGHT_SUFFIXES and (p.stem == arch or p.name.startswith(arch + ".")))
        if found:
            return found[0]
        if strict:
            raise BackboneError(
                f"no weights for '{arch}' in folder {path} (from {origin}); expected a file named "
                f"{arch}[.tag].safetensors (or .pth/.bin/.npz). Pass the file itself with --weights FILE.")
        return None  # a weights folder for other architectures: try the hub cache, then the hub
    if not path.is_file():
        raise BackboneError(f"weights file '{path}' (from {origin}) does not exist. Pass an existing "
                            ".safetensors/.pth/.bin/.npz file with --weights FILE, or leave it empty to use the "
                            f"hub cache or the model hub ({WEIGHTS_DOCS}).")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise BackboneError(f"weights file '{path}' (from {origin}) has an unsupported suffix; use one of "
                            f"{', '.join(WEIGHT_SUFFIXES)}")
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


def _pretrained_cfg(name: str) -> Any:
    try:
        from timm.models import get_pretrained_cfg

        return get_pretrained_cfg(name)
    except Exception:  # unknown name or tag: timm.create_model says so
        return None


def hub_cache_file(pretrained: Any) -> Path | None:
    """The weights of a timm pretrained config already in the hub cache (no network access), or None."""
    hub_id = getattr(pretrained, "hf_hub_id", None)
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo, _, revision = hub_id.partition("@")
            names = [pretrained.hf_hub_filename] if getattr(pretrained, "hf_hub_filename", None) else [
                "model.safetensors", "pytorch_model.bin"]
            for filename in names:
                try:
                    found = try_to_load_from_cache(repo, filename, revision=revision or None)
                except Exception:  # a malformed cache entry: ignore it, the hub may still answer
                    found = None
                if isinstance(found, str) and Path(found).is_file():
                    return Path(found)
    url = getattr(pretrained, "url", None)
    if url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        if cached.is_file():
            return cached
    return None


def hub_unreachable_reason(pretrained: Any) -> str | None:
    """None when the hub can be tried, else why not (``HF_HUB_OFFLINE``, or no connection within seconds)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    if offline in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE is set and they are not in the hub cache"
    if getattr(pretrained, "hf_hub_id", None):
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    else:
        endpoint = getattr(pretrained, "url", None) or "https://huggingface.co"
    target = urlparse(endpoint)
    host, port = target.hostname or "huggingface.co", target.port or (80 if target.scheme == "http" else 443)
    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(k)), "")
    if proxy:  # behind a proxy, the proxy is what must answer
        p = urlparse(proxy if "://" in proxy else "http://" + proxy)
        host, port = p.hostname or host, p.port or 8080
    if not _can_connect(host, port, HUB_PROBE_TIMEOUT_S):
        return (f"the model hub ({host}) cannot be reached (no connection within {HUB_PROBE_TIMEOUT_S:g} s) and "
                "they are not in the hub cache")
    return None


@functools.lru_cache(maxsize=8)
def _can_connect(host: str, port: int, timeout: float) -> bool:
    """A TCP connection to host:port within ``timeout`` seconds, name resolution included (once per process)."""
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=attempt, daemon=True)  # getaddrinfo has no timeout of its own
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def create_backbone(cfg: BackboneConfig) -> nn.Module:
    """A timm ViT with ``num_classes=0`` at ``cfg.img_size``, weights loaded, all parameters frozen.

    The weights come from :func:`resolve_weights` (``model.weights_source`` records which one was used). They
    must provide every tensor of the backbone (names and shapes): a file that lacks some is refused with the
    list of what is missing (and what it holds instead).
    """
    check_architecture(cfg.name)
    kwargs: dict = dict(num_classes=0, img_size=cfg.img_size)
    if cfg.depth:
        kwargs["depth"] = cfg.depth
    source = resolve_weights(cfg) if cfg.pretrained else None
    weights = source.path if source is not None else None
    if weights is not None:
        _check_weights_file(weights)
        overlay = dict(file=str(weights))
        if weights.suffix == ".npz":
            overlay["custom_load"] = True
        kwargs["pretrained_cfg_overlay"] = overlay
    loads: list[tuple[list[str], list[str]]] = []
    origin = f"weights file '{weights}'" if weights is not None else f"the hub weights of '{cfg.name}'"
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
        first = str(e).splitlines()[0] if str(e) else ""
        raise BackboneError(no_weights_message(
            cfg.name, f"the download from the model hub failed ({type(e).__name__}: {first}).")) from None
    except Exception as e:  # hub client errors (connection, missing entry) have their own classes
        if weights is None and type(e).__module__.split(".")[0] in ("huggingface_hub", "requests", "urllib3",
                                                                     "httpx"):
            raise BackboneError(no_weights_message(
                cfg.name, f"the download from the model hub failed ({type(e).__name__}).")) from None
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
                f"{origin}: {len(missing)} of the tensors that '{cfg.name}'"
                f"{f' (depth {cfg.depth})' if cfg.depth else ''} needs are missing: {_listing(missing)}.{extra} Training on it "
                f"would use a partly random backbone. Pass a complete weights file of '{_architecture(cfg.name)}' "
                f"(--weights FILE), or set model.backbone.name to the architecture the file was saved from.")
        if unexpected:
            log.warning("%s hold %d tensor(s) that '%s' does not use (ignored): %s", origin, len(unexpected),
                        cfg.name, _listing(unexpected))
    for attr in ("patch_embed", "blocks", "_pos_embed", "norm", "num_prefix_tokens"):
        if not hasattr(model, attr):
            raise BackboneError(f"'{cfg.name}' is not a timm VisionTransformer (missing '{attr}'); "
                                f"promptdml supports {SUPPORTED_FAMILIES}.")
    model.requires_grad_(False)
    model.eval()
    model.weights_source = source
    if source is not None:
        log.info("backbone weights: %s", source.describe())
    return model


class PromptedViT(nn.Module):
    """Forward of a frozen timm ViT with per-block prompt tokens.

    ``forward(images, prompts)``: ``prompts[i]`` is ``None`` or a tensor ``[n_i, D]`` / ``[B, n_i, D]``
    inserted right after the prefix tokens (CLS, registers, distillation token) before block ``i`` and
    removed after it. Returns the pooled feature ``[B, D]`` after the final norm.
    ``forward_branches(images, [prompts_a, prompts_b, ...])`` gives the same as one ``forward`` per prompt
    set, computed in one pass (see there). :meth:`enable_compile` compiles the per-block computation.
    """

    def __init__(self, vit: nn.Module, pool: str = "cls", grad_checkpointing: bool = False) -> None:
        super().__init__()
        self.vit = vit
        self.pool = pool
        self.grad_checkpointing = grad_checkpointing
        self.num_prefix_tokens: int = int(vit.num_prefix_tokens)
        self.embed_dim: int = int(vit.embed_dim)
        self.depth: int = len(vit.blocks)
        self._compiled: dict[str, Any] | None = None
        self.compile_seconds: float = 0.0
        """Seconds spent in calls that compiled a (forward) graph: compilation plus one run. The backward
        graphs are compiled during the first backward pass."""

    @property
    def feature_dim(self) -> int:
        return self.embed_dim * (2 if self.pool == "cls+avg" else 1)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit.patch_embed(images)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        return vit.norm_pre(x)

    # ---------------------------------------------------------------------------------------------
    # torch.compile (train.compile)
    def enable_compile(self) -> bool:
        """Compile the per-block computation of :meth:`forward` and :meth:`forward_branches` with
        ``torch.compile`` (inductor, on whatever device the model is on), for calls with gradients enabled,
        i.e. training; evaluation (``torch.no_grad``) stays eager, so its varying batch sizes cause no
        recompilation. One graph serves all blocks of the same shape (the blocks are arguments, not
        constants), so compile time does not grow with depth. Returns False, with one warning line, when
        ``torch.compile`` is not available; a compiler failure at the first call (e.g. no C++ toolchain)
        likewise warns once and the model runs eager from then on."""
        try:
            self._compiled = {"plain": torch.compile(_plain_block, dynamic=False),
                              "fused": torch.compile(_fused_block, dynamic=False)}
        except Exception as e:  # noqa: BLE001 - e.g. a Python version torch.compile does not support
            self._compile_failed(e)
            return False
        return True

    @property
    def compiled(self) -> bool:
        """Whether training calls run compiled (False before :meth:`enable_compile` or after a fallback)."""
        return self._compiled is not None

    def _run_block(self, kind: str, *args: Any) -> torch.Tensor:
        eager = _plain_block if kind == "plain" else _fused_block
        if self._compiled is None or not torch.is_grad_enabled():
            return eager(*args)
        from torch._dynamo.utils import counters

        graphs = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        try:
            out = self._compiled[kind](*args)
        except _COMPILER_ERRORS as e:
            self._compile_failed(e)
            return eager(*args)
        if counters["stats"]["unique_graphs"] != graphs:
            self.compile_seconds += time.perf_counter() - t0
        return out

    def _compile_failed(self, e: BaseException) -> None:
        self._compiled = None
        text = str(e).strip()
        first = text.splitlines()[0][:200] if text else ""
        hint = ""
        if isinstance(e, ImportError) or "ImportError" in first:
            from torch._inductor.runtime.cache_dir_utils import cache_dir

            hint = (f"; if the C++ toolchain works, the compiler cache may be corrupt (an interrupted or concurrent"
                    f" build): delete {cache_dir()} or point TORCHINDUCTOR_CACHE_DIR at an empty folder")
        log.warning("train.compile: torch.compile is not available here (%s: %s); training continues eager%s",
                    type(e).__name__, first, hint)

    def _block_call(self, kind: str, *args: Any) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._run_block, kind, *args, use_reentrant=False)
        return self._run_block(kind, *args)

    # ---------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, prompts: Sequence[torch.Tensor | None] = ()) -> torch.Tensor:
        x = self.tokens(images)
        for i in range(self.depth):
            p = prompts[i] if i < len(prompts) else None
            x = self._block_call("plain", self.vit.blocks[i], self.num_prefix_tokens, x, p)
        x = self.vit.norm(x)
        return self.pool_tokens(x)

    # ---------------------------------------------------------------------------------------------
    # Several prompt sets over the same images in one backbone call (the training step's two branches).
    def fusable(self) -> str | None:
        """None when :meth:`forward_branches` can run the blocks fused, else why not (it then runs one
        pass per prompt set, like :meth:`forward`)."""
        for i, block in enumerate(self.vit.blocks):
            if type(block) is not _TimmBlock:
                return f"block {i} is a {type(block).__name__}, not a timm vision_transformer.Block"
            if type(block.attn) is not _TimmAttention:
                return f"block {i}'s attention is a {type(block.attn).__name__}, not timm's Attention"
            for module in (block, block.attn):
                if module._forward_hooks_with_kwargs or module._forward_pre_hooks_with_kwargs:
                    return f"block {i} has forward hooks with keyword arguments"
        return None

    def forward_branches(self, images: torch.Tensor,
                         prompt_sets: Sequence[Sequence[torch.Tensor | None]]) -> list[torch.Tensor]:
        """``[forward(images, p) for p in prompt_sets]`` computed together, equal up to float rounding
        (gradients included), with less work:

        - the patch embedding is computed once for all branches (they see the same images);
        - in each block the tokens of all branches lie side by side (sample b's sequence is its branch-0
          tokens followed by its branch-1 tokens ...), so the LayerNorms, qkv, projection and MLP run once on
          all tokens (one GEMM each instead of one per branch); attention is computed per branch;
        - a block's prompt tokens go only through ``norm1`` and ``qkv``: their keys and values are all the
          other tokens use of them, and :meth:`forward` drops their outputs after the block anyway (VPT-deep);
          shared prompts ``[n, D]`` are normalised and projected once, not once per image;
        - with ``pool='cls'`` the last block computes projection and MLP for the class token only (the
          other tokens' outputs are not used).

        Hooks on the blocks' submodules (LoRA on qkv) and on the blocks and attentions themselves (parallel
        adapters) are applied as in :meth:`forward`. Falls back to separate passes when :meth:`fusable`
        says no."""
        if not prompt_sets:
            return []
        if self.fusable() is not None:
            return [self(images, p) for p in prompt_sets]
        t = self.tokens(images)
        lengths = [t.shape[1]] * len(prompt_sets)
        x = torch.cat([t] * len(prompt_sets), dim=1) if len(prompt_sets) > 1 else t
        for i in range(self.depth):
            prompts = [p[i] if i < len(p) and p[i] is not None and p[i].shape[-2] > 0 else None
                       for p in prompt_sets]
            cls_only = i == self.depth - 1 and self.pool == "cls"
            x = self._block_call("fused", self.vit.blocks[i], self.num_prefix_tokens, x, lengths, prompts, cls_only)
            if cls_only:
                lengths = [1] * len(lengths)
        out, start = [], 0
        for n in lengths:
            out.append(self.pool_tokens(self.vit.norm(x[:, start:start + n])))
            start += n
        return out

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


def _plain_block(block: nn.Module, npt: int, x: torch.Tensor, prompt: torch.Tensor | None) -> torch.Tensor:
    """One block of :meth:`PromptedViT.forward`: ``prompt`` inserted after the ``npt`` prefix tokens,
    removed after the block."""
    if prompt is None or prompt.shape[-2] == 0:
        return block(x)
    n = prompt.shape[-2]
    if prompt.dim() == 2:
        prompt = prompt.unsqueeze(0).expand(x.shape[0], -1, -1)
    x = torch.cat([x[:, :npt], prompt.to(x.dtype), x[:, npt:]], dim=1)
    x = block(x)
    return torch.cat([x[:, :npt], x[:, npt + n:]], dim=1)


# Largest fp32 score tensor [B, H, N, M] (elements) for which the fp32 attention backward is used.
_FP32_BACKWARD_MAX = 16 * 2**20


class _SdpaFp32Backward(torch.autograd.Function):
    """``F.scaled_dot_product_attention(q, k, v)`` (no mask, no dropout) with the same forward (bit for bit),
    and a backward that recomputes the probabilities in fp32 and forms the gradients in fp32 from the
    reduced-precision inputs. On CPU the flash kernel's backward for short sequences (84 px: 47 keys) costs 5x
    its forward, 2.3x this backward; these gradients are also closer to the exact ones (only the final
    rounding to bf16: relative error 1.7e-3 vs 2.4-2.8e-3 for the flash kernel's, measured against fp64)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, k, v)
        return F.scaled_dot_product_attention(q, k, v)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = ctx.saved_tensors
        scale = q.shape[-1] ** -0.5
        acc = torch.promote_types(q.dtype, torch.float32)
        qf, kf, vf, gf = q.to(acc), k.to(acc), v.to(acc), grad.to(acc)
        p = torch.matmul(qf, kf.transpose(-2, -1)).mul_(scale).softmax(-1)
        dv = torch.matmul(p.transpose(-2, -1), gf)
        dp = torch.matmul(gf, vf.transpose(-2, -1))
        ds = (dp - (dp * p).sum(-1, keepdim=True)).mul_(p).mul_(scale)
        return (torch.matmul(ds, kf).to(q.dtype), torch.matmul(ds.transpose(-2, -1), qf).to(k.dtype),
                dv.to(v.dtype))


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention of the fused blocks: the fp32 backward of :class:`_SdpaFp32Backward` for
    bf16/fp16 inputs on CPU with a small score tensor and gradients to compute, else torch's kernel."""
    if (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad)
            and q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= _FP32_BACKWARD_MAX):
        return _SdpaFp32Backward.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def _fused_block(block: nn.Module, npt: int, x: torch.Tensor, lengths: list[int],
                 prompts: list[torch.Tensor | None], cls_only: bool) -> torch.Tensor:
    """timm ``Block.forward`` on side-by-side branches ``x`` ``[B, sum(lengths), D]`` (prompts not
    included), each branch's ``prompts`` entering as extra keys/values of its attention, placed after the
    branch's ``npt`` prefix tokens as in :func:`_plain_block` (the same key order, so each query's attention
    sums in the same order and gives the same bits); ``cls_only``: only each branch's first token is
    returned, ``[B, len(lengths), D]``."""
    attn = block.attn
    starts = [sum(lengths[:j]) for j in range(len(lengths))]

    def attention(h: torch.Tensor) -> torch.Tensor:
        B, N, _ = h.shape
        H, hd = attn.num_heads, attn.head_dim
        gate = attn.gate(h).sigmoid() if getattr(attn, "gate", None) is not None else None
        q, k, v = attn.qkv(h).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        outs = []
        # split (not slicing): its backward is one concatenation, not a zero-filled tensor per branch
        splits = [t.split(lengths, dim=2) if len(lengths) > 1 else (t,) for t in (q, k, v)]
        for qs, ks, vs, p in zip(*splits, prompts, strict=True):
            if cls_only:
                qs = qs[:, :, :1]
            if p is not None:
                hp = block.norm1(p)
                _, kp, vp = attn.qkv(hp).reshape(*hp.shape[:-1], 3, H, hd).movedim(-4, -2).unbind(-4)
                kp = attn.k_norm(kp)
                if p.dim() == 2:  # shared prompts: the same keys and values for every image
                    kp, vp = kp.expand(B, -1, -1, -1), vp.expand(B, -1, -1, -1)
                ks = torch.cat([ks[:, :, :npt], kp.to(ks.dtype), ks[:, :, npt:]], dim=2)
                vs = torch.cat([vs[:, :, :npt], vp.to(vs.dtype), vs[:, :, npt:]], dim=2)
            if attn.fused_attn:
                o = _attention(qs, ks, vs)
            else:
                o = ((qs * attn.scale) @ ks.transpose(-2, -1)).softmax(dim=-1) @ vs
            outs.append(o.transpose(1, 2))
        o = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        o = attn.norm(o.reshape(B, o.shape[1], attn.attn_dim))
        if gate is not None:
            o = o * (gate[:, starts] if cls_only else gate)
        return attn.proj_drop(attn.proj(o))

    def body(x: torch.Tensor) -> torch.Tensor:
        a = _hooked(attn, attention, block.norm1(x))
        if cls_only:
            x = x[:, starts]
        x = x + block.drop_path1(block.ls1(a))
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    return _hooked(block, body, x)
