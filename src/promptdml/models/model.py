"""The trainable retrieval model: frozen ViT + shared prompts + BitFit + head (+ semantic proxy branch)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import timm.data
import torch
import torch.nn as nn

from promptdml.config import ModelConfig
from promptdml.models.backbone import PromptedViT, create_backbone
from promptdml.models.heads import EmbeddingHead
from promptdml.models.prompts import prompt_counts
from promptdml.models.proxies import ProxyOutput, SemanticProxies
from promptdml.models.tuners import Site, Tuner, enabled_tuners, tuners
from promptdml.registry import CLASS_PROMPT_SOURCES


@dataclass
class TrainOutput:
    embeddings: torch.Tensor
    """[B, E] L2-normalised embeddings (the inference path)."""
    proxy: ProxyOutput


class PromptDMLModel(nn.Module):
    """VPTSP-G: ``forward(images)`` gives embeddings; ``forward_train`` also gives the proxies.

    Trainable: what the enabled tuners own (``models/tuners.py``: shared prompts, BitFit, adapters, LoRA, the full
    backbone), the heads, the container GRU, the class prompts (source ``model.class_prompts.source``; the memory
    bank keeps a table on the CPU) and the proxy bias; the rest is frozen, the backbone stays in eval mode.
    The baselines come from the config: no prompts, VPT-shallow, plain proxies (``proxy.semantic=False``),
    BitFit on/off, adapters, LoRA on qkv, full fine-tuning."""

    def __init__(self, cfg: ModelConfig, num_classes: int, backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        vit = backbone if backbone is not None else create_backbone(cfg.backbone)
        self.backbone = PromptedViT(vit, cfg.backbone.pool, cfg.backbone.grad_checkpointing)
        self.pretrained_cfg = dict(getattr(vit, "pretrained_cfg", {}) or {})
        self.data_config = timm.data.resolve_data_config({}, model=vit)
        depth, width = self.backbone.depth, self.backbone.embed_dim
        site = Site(vit, depth, width, cfg)
        self.tuners = enabled_tuners(cfg)
        for tuner in tuners():
            if tuner.attr and tuner not in self.tuners:
                setattr(self, tuner.attr, None)
        # attached in registration order; the shared prompts before the heads (the original init order)
        for tuner in [t for t in self.tuners if t.before_heads]:
            self._attach(tuner, site)
        self.embed_head = EmbeddingHead(self.backbone.feature_dim, cfg.embed_dim, cfg.center_features)
        for tuner in [t for t in self.tuners if not t.before_heads]:
            self._attach(tuner, site)
        self.semantic = cfg.proxy.semantic
        self.memory_bank = self.semantic and cfg.class_prompts.source == "table" and (
            cfg.memory_bank == "on" or (cfg.memory_bank == "auto" and num_classes >= cfg.memory_bank_threshold))
        if self.semantic:
            p = cfg.prompts
            counts = prompt_counts(p.num_p_prompt, p.p_prompt_depth, p.prompt_p_block_step, depth)
            source = CLASS_PROMPT_SOURCES.get(cfg.class_prompts.source)
            self.class_prompts = source(num_classes, counts, width, memory_bank=self.memory_bank,
                                        cfg=cfg.class_prompts, feature_dim=self.backbone.feature_dim)
            self.proxy_head = EmbeddingHead(self.backbone.feature_dim, cfg.embed_dim, cfg.center_features)
        self.proxies = SemanticProxies(num_classes, cfg.embed_dim, cfg.proxy)

    def _attach(self, tuner: Tuner, site: Site) -> None:
        module = tuner.attach(site)
        if module is not None:
            setattr(self, tuner.owner, module)

    # ---------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings ``[B, E]`` (float32)."""
        return self.embed_head(self.backbone(images, self.shared_prompts()))

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, samples_per_class: int,
                      gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> TrainOutput:
        """Embeddings and proxies for a class-balanced batch (k contiguous images per class).

        ``gather`` (distributed training) concatenates a tensor over all ranks with gradient flowing back
        (``engine/distributed.py``): the container rows are updated from this rank's images only, then all
        ranks' classes and new rows are gathered and the proxies are built for the global batch, identically
        on every rank. The returned embeddings stay local (the trainer gathers them)."""
        fused = self.semantic and self.cfg.backbone.fused_branches  # one backbone call for both branches
        if fused:
            features, proxy_features = self.backbone.forward_branches(
                images, [self.shared_prompts(), self.class_prompts(labels)])
            emb = self.embed_head(features)
        else:
            emb = self(images)
        k = samples_per_class
        if not self.semantic:
            return TrainOutput(emb, self.proxies((labels if gather is None else gather(labels)).unique(), None))
        if labels.numel() % k:
            raise ValueError(f"batch of {labels.numel()} images is not a multiple of samples_per_class={k}")
        grouped = labels.view(-1, k)
        classes = grouped[:, 0]
        if not bool((grouped == classes[:, None]).all()) or classes.unique().numel() != classes.numel():
            raise ValueError("the semantic proxy branch needs class-balanced batches: batch_size/k distinct "
                             "classes with k contiguous images each (use ClassBalancedBatchSampler)")
        q = (self.proxy_head(proxy_features) if fused else self.proxy_features(images, labels))
        q = q.view(classes.numel(), k, -1)
        if gather is None:
            return TrainOutput(emb, self.proxies(classes, q))
        h = self.proxies.update_rows(q, classes)
        all_classes = gather(classes)
        if all_classes.unique().numel() != all_classes.numel():
            raise ValueError("distributed training needs disjoint classes across ranks within a step "
                             "(each global batch is split by whole classes)")
        return TrainOutput(emb, self.proxies.assemble(all_classes, gather(h)))

    def proxy_features(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """L2-normalised proxy-branch features ``q`` ``[B, E]``: the images with their class prompts, through the
        proxy head (what the container update consumes)."""
        return self.proxy_head(self.backbone(images, self.class_prompts(labels)))

    def head_inputs(self, images: torch.Tensor, labels: torch.Tensor, branch: str = "embedding") -> torch.Tensor:
        """``[B, D]`` LayerNorm outputs inside the embedding head (``branch='embedding'``) or the proxy head on
        the class-prompted pass (``'proxy'``): what the head's Linear sees (for data-dependent init)."""
        if branch == "proxy":
            return self.proxy_head.norm(self.backbone(images, self.class_prompts(labels)))
        return self.embed_head.norm(self.backbone(images, self.shared_prompts()))

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
    def row_placements(self) -> list:
        """Placements of the row tables trained with lazy row semantics (the ``table`` source's rows)."""
        place = getattr(self.class_prompts, "placement", None) if self.semantic else None
        return [] if place is None else [place]

    def trainable_groups(self) -> OrderedDict[str, list[tuple[str, nn.Parameter]]]:
        """Trainable parameters by owner (each can receive a gradient): each enabled tuner's module (a tuner
        without one, BitFit or full fine-tuning, owns the backbone's trainable parameters no module claims),
        then the heads, the class-prompt source's groups (its ``parameter_groups``), container GRU and proxy
        bias. With the memory bank the ``class_prompts`` entry is the CPU table (a plain tensor)."""
        def own(prefix: str, module: nn.Module | None) -> list[tuple[str, nn.Parameter]]:
            return [] if module is None else list(module.named_parameters(prefix=prefix))

        # (group, its parameters); None: a tuner without a module, owning the backbone's remaining trainables
        parts = [(t.group_name, own(t.owner, m) if (m := getattr(self, t.owner, None)) is not None else None)
                 for t in self.tuners]
        source = getattr(self, "class_prompts", None)
        class_parts = [] if source is None else source.parameter_groups("class_prompts.")
        parts += [("embed_head", own("embed_head", self.embed_head)), *class_parts,
                  ("proxy_head", own("proxy_head", getattr(self, "proxy_head", None))),
                  ("container_gru", own("proxies.gru", self.proxies.gru)),
                  ("proxy_bias", [("proxies.bias", self.proxies.bias)])]
        claimed: set[int] = set()
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {}

        def take(group: str, named: list[tuple[str, nn.Parameter]]) -> None:
            ps = [(n, p) for n, p in named if p.requires_grad and p.numel() and id(p) not in claimed]
            claimed.update(id(p) for _, p in ps)
            groups.setdefault(group, []).extend(ps)

        for group, named in parts:  # modules first, then the unfreezing tuners take the backbone's rest
            if named is not None:
                take(group, named)
        for group, named in parts:
            if named is None:
                take(group, own("backbone", self.backbone))
        if self.memory_bank and self.class_prompts.table.numel():
            groups["class_prompts"].append(("class_prompts.table", self.class_prompts.table))
        return OrderedDict((g, groups[g]) for g, _ in parts if groups.get(g))

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of the tuners that touch the backbone (what ``optim.head_warmup_epochs``
        holds fixed and ``optim.backbone_lr_scale`` scales)."""
        groups = self.trainable_groups()
        return [p for t in self.tuners if t.touches_backbone for _, p in groups.get(t.group_name, [])]

    def trainable_state(self) -> OrderedDict[str, torch.Tensor]:
        """What a checkpoint stores: trainable parameters (the memory bank's CPU table under the same name), the
        proxy container and the class-prompt source's buffers (``generated``: the class descriptors)."""
        state = OrderedDict((n, p.detach()) for n, p in self.named_parameters() if p.requires_grad)
        if self.memory_bank:
            state["class_prompts.table"] = self.class_prompts.table
        if self.semantic:
            state["proxies.container"] = self.proxies.container
            state.update(self.class_prompts.named_buffers(prefix="class_prompts"))
        state.update((n, b) for n, b in self.named_buffers() if n.endswith("head.running_mean"))
        return state

    def merge_into_backbone(self) -> int:
        """Fold mergeable tuners (LoRA) into the frozen weights for inference; returns the number of merged
        layers. Raises :class:`~promptdml.models.peft.MergeError` for a tuner that cannot be merged (adapters)."""
        modules = [(t, getattr(self, t.owner, None)) for t in self.tuners if t.merges is not None]
        for tuner, module in modules:
            if tuner.merges is False and module is not None:
                module.merge_into_backbone()
        merged = 0
        for tuner, module in modules:
            if tuner.merges and module is not None:
                module.merge_into_backbone()
                merged += len(module)
        return merged

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.trainable_state())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the model built from its config: missing "
                             f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        own = dict(self.named_parameters()) | dict(self.named_buffers())
        if self.memory_bank:
            own["class_prompts.table"] = self.class_prompts.table
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
    if model.memory_bank:  # the CPU table is not a registered parameter
        counts["all"] += model.class_prompts.table.numel()
    counts["backbone"] = sum(p.numel() for p in model.backbone.parameters())
    return counts


def format_parameter_report(model: PromptDMLModel) -> str:
    """One line per trainable group (with % of the backbone), then the
    ``trainable params: N || all params: M || trainable%: P`` summary."""
    c = count_parameters(model)
    lines = [f"{'group':<16}{'params':>12}{'% of backbone':>16}"]
    for g in model.trainable_groups():
        lines.append(f"{g:<16}{c[g]:>12,}{100 * c[g] / c['backbone']:>15.3f}%")
    describe = getattr(getattr(model, "class_prompts", None), "describe", None) if model.semantic else None
    if describe is not None:
        lines.append(f"class prompts: {describe()}")
    if model.memory_bank:
        lines.append("memory bank: on (class-prompt table and its optimiser state on the CPU)")
    lines.append(f"trainable params: {c['trainable']:,} || all params: {c['all']:,} || "
                 f"trainable%: {100 * c['trainable'] / c['all']:.4f}")
    return "\n".join(lines)
