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
from promptdml.models.memory_bank import RowwiseOptimizer
from promptdml.models.peft import LoRA, ParallelAdapters
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

    The same class builds the baselines from its config: no prompts (``num_prompt=0``), VPT-shallow
    (``prompt_depth=1``), plain proxies (``proxy.semantic=False``), BitFit on/off, parallel adapters
    (``adapter.bottleneck>0``), LoRA on qkv (``lora.rank>0``) and full fine-tuning (``full_finetune``).
    With the memory bank (``memory_bank``) the class-prompt table stays on the CPU.
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
        self.embed_head = EmbeddingHead(self.backbone.feature_dim, cfg.embed_dim, cfg.center_features)
        self.full_finetune = cfg.full_finetune
        if cfg.full_finetune:
            vit.requires_grad_(True)
        elif cfg.bitfit:
            for name, param in vit.named_parameters():
                if name.endswith("bias"):
                    param.requires_grad_(True)
        self.adapters = ParallelAdapters(vit.blocks, width, cfg.adapter) if cfg.adapter.bottleneck > 0 else None
        self.lora = LoRA(vit.blocks, cfg.lora) if cfg.lora.rank > 0 else None
        self.semantic = cfg.proxy.semantic
        self.memory_bank = self.semantic and (
            cfg.memory_bank == "on" or (cfg.memory_bank == "auto" and num_classes >= cfg.memory_bank_threshold))
        if self.semantic:
            counts = prompt_counts(p.num_p_prompt, p.p_prompt_depth, p.prompt_p_block_step, depth)
            self.class_prompts = ClassPrompts(num_classes, counts, width, memory_bank=self.memory_bank)
            self.proxy_head = EmbeddingHead(self.backbone.feature_dim, cfg.embed_dim, cfg.center_features)
        self.proxies = SemanticProxies(num_classes, cfg.embed_dim, cfg.proxy)

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
        if self.semantic:
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
                out = self.proxies(classes, q)
            else:
                h = self.proxies.update_rows(q, classes)
                all_classes = gather(classes)
                if all_classes.unique().numel() != all_classes.numel():
                    raise ValueError("distributed training needs disjoint classes across ranks within a step "
                                     "(each global batch is split by whole classes)")
                out = self.proxies.assemble(all_classes, gather(h))
        else:
            out = self.proxies((labels if gather is None else gather(labels)).unique(), None)
        return TrainOutput(emb, out)

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
    # The class-prompt table's row-wise optimiser (models/memory_bank.py); the trainer calls these.
    def _row_tables(self) -> list[ClassPrompts]:
        return [self.class_prompts] if self.semantic else []

    def configure_row_optimizer(self, kind: str, momentum: float = 0.9, weight_decay: float = 0.0) -> None:
        """Set the row-wise optimiser of the class-prompt table (same type and hyper-parameters as the
        torch optimiser of the other parameters; its learning rate is passed to :meth:`step_rows`)."""
        for table in self._row_tables():
            table.optimizer = RowwiseOptimizer(kind, momentum=momentum, weight_decay=weight_decay)

    def unscale_row_grads_(self, inv_scale: float) -> None:
        for table in self._row_tables():
            table.unscale_grad_(inv_scale)

    def exchange_row_grads(self, gather_varlen: Callable[[torch.Tensor], list[torch.Tensor]]) -> None:
        """Distributed: replace each rank's pending class-prompt gradient (its own classes' rows) by the union
        over all ranks, so every rank steps the same rows with the same gradients (``gather_varlen`` returns
        every rank's tensor). Only the batch's rows travel, never the table."""
        for table in self._row_tables():
            table.exchange_pending_grad(gather_varlen)

    def step_rows(self, lr: float) -> bool:
        """Step the class-prompt rows of the last training forward (after backward); False if skipped."""
        return all([table.step(lr) for table in self._row_tables()])

    def row_optimizer_state_dict(self) -> dict:
        """State of the class-prompt row-wise optimiser (momentum / Adam moments and per-row step counts), for
        resuming; empty without the semantic branch. Tensors stay where they live (CPU with the bank)."""
        return {"class_prompts": self.class_prompts.optimizer.state_dict()} if self.semantic else {}

    def load_row_optimizer_state_dict(self, state: dict) -> None:
        if self.semantic and state:
            opt = self.class_prompts.optimizer
            opt.load_state_dict(state["class_prompts"])
            opt.state = {k: v.to(self.class_prompts.table.device) for k, v in opt.state.items()}

    def gradient_tensors(self) -> list[torch.Tensor]:
        """Every tensor that holds a gradient of this step (trainable parameters + the memory bank's device
        rows), e.g. for global-norm gradient clipping."""
        params = [p for ps in self.trainable_groups().values() for _, p in ps if isinstance(p, nn.Parameter)]
        return params + [t for table in self._row_tables() if table.memory_bank for t in table.grad_tensors()]

    # ---------------------------------------------------------------------------------------------
    GROUPS = ("shared_prompts", "bitfit", "backbone_full", "adapter", "lora", "embed_head", "class_prompts",
              "proxy_head", "container_gru", "proxy_bias")

    def trainable_groups(self) -> OrderedDict[str, list[tuple[str, nn.Parameter]]]:
        """Trainable parameters by role (each can receive a gradient).

        With the memory bank the ``class_prompts`` entry is the CPU table (a plain tensor, not a registered
        parameter)."""
        groups: OrderedDict[str, list[tuple[str, nn.Parameter]]] = OrderedDict((g, []) for g in self.GROUPS)
        for name, param in self.named_parameters():
            if not param.requires_grad or param.numel() == 0:
                continue
            if name.startswith("backbone."):
                group = "backbone_full" if self.full_finetune else "bitfit"
            elif name.startswith("adapters."):
                group = "adapter"
            elif name.startswith("proxies.gru."):
                group = "container_gru"
            elif name == "proxies.bias":
                group = "proxy_bias"
            else:
                group = name.split(".", 1)[0]
            groups[group].append((name, param))
        if self.memory_bank and self.class_prompts.table.numel():
            groups["class_prompts"].append(("class_prompts.table", self.class_prompts.table))
        return OrderedDict((g, ps) for g, ps in groups.items() if ps)

    BACKBONE_GROUPS = ("shared_prompts", "bitfit", "backbone_full", "adapter", "lora")
    """Trainable groups that change the backbone's features on the embedding path."""

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of :attr:`BACKBONE_GROUPS` (what ``optim.head_warmup_epochs`` holds fixed)."""
        groups = self.trainable_groups()
        return [p for g in self.BACKBONE_GROUPS if g in groups for _, p in groups[g]]

    def trainable_state(self) -> OrderedDict[str, torch.Tensor]:
        """What a checkpoint stores: trainable parameters (including the memory bank's CPU table, under the
        same name as without the bank) and the proxy container."""
        state = OrderedDict((n, p.detach()) for n, p in self.named_parameters() if p.requires_grad)
        if self.memory_bank:
            state["class_prompts.table"] = self.class_prompts.table
        if self.semantic:
            state["proxies.container"] = self.proxies.container
        state.update((n, b) for n, b in self.named_buffers() if n.endswith("head.running_mean"))
        return state

    def merge_into_backbone(self) -> int:
        """Fold LoRA updates into the frozen qkv weights for inference; returns the number of merged layers.

        Raises :class:`~promptdml.models.peft.MergeError` for adapters (non-linear, cannot be merged)."""
        if self.adapters is not None:
            self.adapters.merge_into_backbone()
        if self.lora is None:
            return 0
        self.lora.merge_into_backbone()
        return len(self.lora)

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
    if model.memory_bank:
        lines.append("memory bank: on (class-prompt table and its optimiser state on the CPU)")
    lines.append(f"trainable params: {c['trainable']:,} || all params: {c['all']:,} || "
                 f"trainable%: {100 * c['trainable'] / c['all']:.4f}")
    return "\n".join(lines)
