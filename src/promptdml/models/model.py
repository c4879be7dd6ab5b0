"""The trainable retrieval model: frozen ViT + shared prompts + BitFit + head (+ semantic proxy branch)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import timm.data
import torch
import torch.nn as nn

from promptdml.config import ModelConfig
from promptdml.models.backbone import PromptedViT, create_backbone
from promptdml.models.heads import EmbeddingHead
from promptdml.models.prompts import ClassPrompts, DeepPrompts, prompt_counts
from promptdml.models.proxies import ProxyOutput, SemanticProxies


@dataclass
class TrainOutput:
    embeddings: torch.Tensor
    """[B, E] L2-normalised embeddings (the inference path)."""
    proxy: ProxyOutput


class PromptDMLModel(nn.Module):
    """VPTSP-G: ``forward(images)`` gives embeddings; ``forward_train`` also gives the proxies.

    Only prompts, backbone biases (BitFit), heads, the container GRU, class prompts and the proxy bias
    are trainable; every other backbone weight is frozen and the backbone stays in eval mode.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int, backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        vit = backbone if backbone is not None else create_backbone(cfg.backbone)
        self.backbone = PromptedViT(vit, cfg.backbone.pool, cfg.backbone.grad_checkpointing)
        self.pretrained_cfg = dict(getattr(vit, "pretrained_cfg", {}) or {})
        self.data_config = timm.data.resolve_data_config({}, model=vit)
        depth, width = self.backbone.depth, self.backbone.embed_dim
        p = cfg.prompts
        self.shared_prompts = DeepPrompts(prompt_counts(p.num_prompt, p.prompt_depth, p.prompt_block_step, depth),
                                          width)
        self.embed_head = EmbeddingHead(self.backbone.feature_dim, cfg.embed_dim)
        if cfg.bitfit:
            for name, param in vit.named_parameters():
                if name.endswith("bias"):
                    param.requires_grad_(True)
        self.semantic = cfg.proxy.semantic
        if self.semantic:
            counts = prompt_counts(p.num_p_prompt, p.p_prompt_depth, p.prompt_p_block_step, depth)
            self.class_prompts = ClassPrompts(num_classes, counts, width)
            self.proxy_head = EmbeddingHead(self.backbone.feature_dim, cfg.embed_dim)
        self.proxies = SemanticProxies(num_classes, cfg.embed_dim, cfg.proxy)

    # ---------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings ``[B, E]`` (float32)."""
        return self.embed_head(self.backbone(images, self.shared_prompts()))

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, samples_per_class: int) -> TrainOutput:
        """Embeddings and proxies for a class-balanced batch (k contiguous images per class)."""
        emb = self(images)
        k = samples_per_class
        if self.semantic:
            if labels.numel() % k:
                raise ValueError(f"batch of {labels.numel()} images is not a multiple of samples_per_class={k}")
            grouped = labels.view(-1, k)
            classes = grouped[:, 0]
            if not bool((grouped == classes[:, None]).all()) or classes.unique().numel() != classes.numel():
                raise ValueError("the semantic proxy branch needs class-balanced batches: batch_size/k distinct "
                                 "classes with k contiguous images each (use ClassBalancedBatchSampler)")
            feats = self.backbone(images, self.class_prompts(labels))
            q = self.proxy_head(feats).view(classes.numel(), k, -1)
            out = self.proxies(classes, q)
        else:
            out = self.proxies(labels.unique(), None)
        return TrainOutput(emb, out)

    @torch.no_grad()
    def commit(self, out: TrainOutput) -> None:
        """Write the batch's updated container rows (after a successful optimiser step)."""
        if out.proxy.new_rows is not None:
            self.proxies.write_rows(out.proxy.batch_classes, out.proxy.new_rows)

    def train(self, mode: bool = True) -> PromptDMLModel:
        super().train(mode)
        self.backbone.train(False)  # frozen backbone: always eval mode
        return self

    # ---------------------------------------------------------------------------------------------
    def trainable_groups(self) -> OrderedDict[str, list[tuple[str, nn.Parameter]]]:
        """Trainable parameters by role (each can receive a gradient)."""
        groups: OrderedDict[str, list[tuple[str, nn.Parameter]]] = OrderedDict(
            (g, []) for g in ("shared_prompts", "bitfit", "embed_head", "class_prompts", "proxy_head",
                              "container_gru", "proxy_bias"))
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if name.startswith("backbone."):
                group = "bitfit"
            elif name.startswith("proxies.gru."):
                group = "container_gru"
            elif name == "proxies.bias":
                group = "proxy_bias"
            else:
                group = name.split(".", 1)[0]
            groups[group].append((name, param))
        return OrderedDict((g, ps) for g, ps in groups.items() if ps)

    def trainable_state(self) -> OrderedDict[str, torch.Tensor]:
        """What a checkpoint stores: trainable parameters and the proxy container."""
        state = OrderedDict((n, p.detach()) for n, p in self.named_parameters() if p.requires_grad)
        if self.semantic:
            state["proxies.container"] = self.proxies.container
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.trainable_state())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the model built from its config: missing "
                             f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        own = dict(self.named_parameters()) | dict(self.named_buffers())
        with torch.no_grad():
            for name, value in state.items():
                if own[name].shape != value.shape:
                    raise ValueError(f"checkpoint tensor '{name}' has shape {tuple(value.shape)}, the model "
                                     f"expects {tuple(own[name].shape)}")
                own[name].copy_(value)


def create_model(cfg: ModelConfig, num_classes: int, backbone: nn.Module | None = None) -> PromptDMLModel:
    """Build the method's model for ``num_classes`` training classes."""
    if num_classes < 2:
        raise ValueError(f"need at least 2 training classes, got {num_classes}")
    return PromptDMLModel(cfg, num_classes, backbone)


def count_parameters(model: PromptDMLModel) -> dict[str, int]:
    """Trainable parameters per group plus totals (``trainable``, ``all``, ``backbone``)."""
    counts = {g: sum(p.numel() for _, p in ps) for g, ps in model.trainable_groups().items()}
    counts["trainable"] = sum(counts.values())
    counts["all"] = sum(p.numel() for p in model.parameters())
    counts["backbone"] = sum(p.numel() for p in model.backbone.parameters())
    return counts


def format_parameter_report(model: PromptDMLModel) -> str:
    c = count_parameters(model)
    lines = [f"{'group':<16}{'params':>12}{'% of backbone':>16}"]
    for g in model.trainable_groups():
        lines.append(f"{g:<16}{c[g]:>12,}{100 * c[g] / c['backbone']:>15.3f}%")
    lines.append(f"trainable params: {c['trainable']:,} || all params: {c['all']:,} || "
                 f"trainable%: {100 * c['trainable'] / c['all']:.4f}")
    return "\n".join(lines)
