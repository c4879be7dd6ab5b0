"""Typed configuration tree, YAML loading (plain and the authors' ``{desc, value}`` form) and overrides.

A run is described by one :class:`Config`. YAML files and ``--set section.key=value`` overrides are
resolved into it; unknown keys are rejected with the closest valid names. Command-line overrides
always win over the YAML file.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from promptdml.authors_format import (  # noqa: F401 - AUTHORS_KEYS re-exported for the config reference
    AUTHORS_KEYS,
    authors_to_nested,
    is_authors_format,
    unwrap_desc_value,
)
from promptdml.errors import ConfigError

# Choices are Literal annotations: they drive validation (Config.validate), the CLI's choices= and the type
# column of the generated configuration reference (one source; choices_of reads them).
Pool = Literal["cls", "avg", "cls+avg"]
HeadInit = Literal["xavier", "centered"]
ContainerUpdate = Literal["gru_relu", "gru", "mix"]
BiasInit = Literal["normal", "kaiming", "class_mean"]
ContainerInit = Literal["random", "class_mean"]
ProxyRange = Literal["both_all", "in_batch"]
Normalization = Literal["standard", "authors"]
OptimizerName = Literal["sgd", "adamw"]
SchedulerName = Literal["cosine", "constant"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
ClassPromptSource = Literal["table", "lowrank", "generated"]


@dataclass
class DataConfig:
    """Where the images come from and how batches are formed."""

    dataset: str = "demo"
    # choices: the registered datasets (promptdml.registry.DATASETS); describe_keys lists them
    root: str = ""
    """Data root: for benchmarks the folder holding ``<dataset>/``; for ``folder`` the folder of class
    sub-folders; for ``csv`` the list file; for ``demo`` where the generated images are cached."""
    train_ratio: float = 0.5
    """folder/csv/demo: fraction of the sorted classes used for training (the rest is the test set)."""
    val_ratio: float = 0.0
    """Fraction of the training classes held out as a validation split (0 = none)."""
    batch_size: int = 64
    """Images per training batch (B); must be divisible by data.samples_per_class."""
    samples_per_class: int = 2
    """k: images per class in a batch; the batch holds batch_size / k distinct classes."""
    batches_per_epoch: int = 0
    """0 = len(train set) // batch_size."""
    num_workers: int = 2
    """Data-loading worker processes (0 = load in the main process)."""
    cache: str = "none"
    """none | auto | PATH: decoded-image cache for training (decode + resize once, augment the tensor)."""
    demo_classes: int = 64
    """demo: number of generated classes."""
    demo_images_per_class: int = 16
    """demo: generated images per class."""
    demo_image_size: int = 96
    """demo: side length of the generated images in pixels."""

    def validate(self, cfg: Config) -> None:
        """Check this section's values (data.dataset is checked against the registry by Config.validate)."""
        if self.samples_per_class < 1:
            raise ConfigError("data.samples_per_class must be >= 1")
        if self.batch_size % self.samples_per_class != 0:
            raise ConfigError(
                f"data.batch_size ({self.batch_size}) must be divisible by data.samples_per_class "
                f"({self.samples_per_class}): a batch holds batch_size / k classes with k images each. "
                f"Try batch_size={self.batch_size - self.batch_size % self.samples_per_class or self.samples_per_class}.")
        if self.batch_size // self.samples_per_class < 2:
            raise ConfigError("data.batch_size / data.samples_per_class must be >= 2 (at least two classes "
                              "per batch, otherwise the loss has no negatives)")
        if not 0.0 < self.train_ratio < 1.0:
            raise ConfigError("data.train_ratio must be in (0, 1)")
        if not 0.0 <= self.val_ratio < 1.0:
            raise ConfigError("data.val_ratio must be in [0, 1)")
        if not isinstance(self.cache, str) or not self.cache.strip():
            raise ConfigError(f"data.cache must be none, auto or a folder path, got {self.cache!r}")
        _at_least(("data.batch_size", self.batch_size, 1), ("data.num_workers", self.num_workers, 0),
                  ("data.batches_per_epoch", self.batches_per_epoch, 0), ("data.demo_classes", self.demo_classes, 4),
                  ("data.demo_images_per_class", self.demo_images_per_class, 2),
                  ("data.demo_image_size", self.demo_image_size, 8))


@dataclass
class BackboneConfig:
    """The frozen timm Vision Transformer."""

    name: str = "vit_small_patch16_224.augreg_in21k"
    """timm model name of the frozen ViT, e.g. vit_small_patch16_224.augreg_in21k or
    vit_small_patch14_dinov2.lvd142m."""
    weights: str = ""
    """Local weights file (.safetensors/.pth/.bin/.npz). Empty = download from the model hub."""
    pretrained: bool = True
    """False builds a randomly initialised backbone (tests only)."""
    img_size: int = 224
    """Input resolution in pixels (position embeddings are resampled to it)."""
    pool: Pool = "cls"
    """cls | avg | cls+avg: which tokens of the final norm feed the heads."""
    grad_checkpointing: bool = False
    """Recompute block activations in the backward pass (less memory, slower)."""
    fused_branches: bool = True
    """Training: run the embedding pass (shared prompts) and the proxy pass (class prompts) as one backbone
    call, both branches' tokens through each block's LayerNorm / qkv / projection / MLP together and attention
    per branch (docs/performance.md): 0.69x the two-pass step at 84 px / batch 64 on CPU, 0.93x at 224 px /
    batch 16. Equal to two separate passes up to float rounding (false = two passes, the path of the results
    stored before it became the default)."""
    depth: int = 0
    """Override the number of blocks (0 = the architecture's own; for tiny test models)."""

    def validate(self, cfg: Config) -> None:
        """Check this section's values."""
        _at_least(("model.backbone.img_size", self.img_size, 1), ("model.backbone.depth", self.depth, 0))


@dataclass
class PromptConfig:
    """Shared deep prompts (embedding path) and class prompts (semantic proxy path)."""

    num_prompt: int = 10
    """Shared prompts (embedding path): block i gets max(num_prompt - i * prompt_block_step, 0) prompts
    (0 = none)."""
    prompt_depth: int = 12
    """Number of blocks, from the first, that get shared prompts (1 = VPT-shallow)."""
    prompt_block_step: int = 0
    """How many fewer shared prompts each following block gets."""
    num_p_prompt: int = 3
    """Class prompts (semantic proxy path): block i gets max(num_p_prompt - i * prompt_p_block_step, 0)
    prompts of the sample's class."""
    p_prompt_depth: int = 12
    """Number of blocks, from the first, that get class prompts."""
    prompt_p_block_step: int = 0
    """How many fewer class prompts each following block gets."""

    def validate(self, cfg: Config) -> None:
        """Check this section's values: every count and step is >= 0."""
        for name in ("num_prompt", "prompt_depth", "prompt_block_step", "num_p_prompt", "p_prompt_depth",
                     "prompt_p_block_step"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.prompts.{name} must be >= 0")


@dataclass
class ProxyConfig:
    """Semantic proxies: container update and bias mixing."""

    semantic: bool = True
    """False = the 'plain proxies' baseline: proxies are learnable vectors only."""
    container_update: ContainerUpdate = "gru_relu"
    """gru_relu | gru | mix"""
    mix_keep_ratio: float = 0.9
    """mix: H[c] = keep * H[c] + (1 - keep) * mean_j q[c, j]."""
    proxy_bias_ratio: float = 0.5
    """lambda: P = lambda * P_bias + (1 - lambda) * H."""
    rnn_dropout: float = 0.0
    """Dropout on the GRU output (the new container row); gru_relu and gru only."""
    bias_init: BiasInit = "normal"
    """normal (N(0, bias_init_std), for VPTSP-G and the plain-proxies baseline alike, so that the ablation
    changes one thing) | kaiming (Proxy Anchor's own init, row norm about 2.6 at 114 classes: SGD moves such
    proxies about 280x slower in angle) | class_mean (each class's mean embedding of its training images,
    computed once before training with the initial prompts and head: every proxy starts at its class)"""
    container_init: ContainerInit = "random"
    """random (unit rows) | class_mean (each row the class's mean proxy-branch feature, computed once before
    training with the initial class prompts and proxy head)"""
    bias_init_std: float = 0.01
    """Standard deviation of the proxy-bias initialisation (bias_init=normal)."""

    def validate(self, cfg: Config) -> None:
        """Check this section's values."""
        if not 0.0 <= self.proxy_bias_ratio <= 1.0:
            raise ConfigError("model.proxy.proxy_bias_ratio must be in [0, 1]")
        if not 0.0 <= self.mix_keep_ratio <= 1.0:
            raise ConfigError("model.proxy.mix_keep_ratio must be in [0, 1]")
        if not 0.0 <= self.rnn_dropout < 1.0:
            raise ConfigError("model.proxy.rnn_dropout must be in [0, 1)")
        _non_negative(("model.proxy.bias_init_std", self.bias_init_std))


@dataclass
class AdapterConfig:
    """AdaptFormer-style parallel adapters: per block, scale * up(relu(down(x))) added next to the MLP branch."""

    bottleneck: int = 0
    """Hidden width of each adapter (0 = no adapters)."""
    scale: float = 0.1
    """Multiplier s of the adapter output."""
    dropout: float = 0.0
    """Dropout inside the adapter (after the activation)."""

    def validate(self, cfg: Config) -> None:
        """Check this section's values."""
        if self.bottleneck < 0:
            raise ConfigError("model.adapter.bottleneck must be >= 0 (0 = no adapters)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("model.adapter.dropout must be in [0, 1)")


@dataclass
class LoRAConfig:
    """LoRA on every block's attention qkv projection: W x + (alpha / rank) * B A x, B zero-initialised."""

    rank: int = 0
    """Rank r of the update (0 = no LoRA)."""
    alpha: float = 16.0
    """Scaling numerator: the update is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""

    def validate(self, cfg: Config) -> None:
        """Check this section's values."""
        if self.rank < 0:
            raise ConfigError("model.lora.rank must be >= 0 (0 = no LoRA)")
        if self.rank > 0 and self.alpha <= 0:
            raise ConfigError("model.lora.alpha must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("model.lora.dropout must be in [0, 1)")


@dataclass
class ClassPromptConfig:
    """Where the class prompts of the semantic proxy path come from (docs/method.md, "Class prompts at scale")."""

    source: ClassPromptSource = "table"
    """table (one free prompt set per class: C x T x D parameters, the paper's; T = class prompts summed over
    the blocks) | lowrank (per-class codes [C, rank] times shared bases [rank, T x D]: C x rank + rank x T x D)
    | generated (a small network maps each class's mean frozen-backbone feature to its prompts: no per-class
    parameters)"""
    rank: int = 16
    """lowrank: length of each class's code; generated: rank of the optional per-class residual."""
    hidden: int = 256
    """generated: hidden width of the prompt generator LayerNorm(F) -> Linear(F, hidden) -> GELU ->
    Linear(hidden, T x D)."""
    generated_residual: bool = False
    """generated: add a per-class low-rank residual (codes [C, rank] times a basis [rank, T x D], the basis
    zero-initialised) to the generated prompts."""
    center_descriptors: bool = True
    """generated: subtract the mean over the training classes from the class descriptors (each class's mean
    frozen-backbone feature), so that they keep what tells the classes apart rather than the domain's common
    direction."""

    def validate(self, cfg: Config) -> None:
        """Check this section's values; the memory bank holds only the table source's rows."""
        _at_least(("model.class_prompts.rank", self.rank, 1), ("model.class_prompts.hidden", self.hidden, 1))
        if self.source != "table" and cfg.model.memory_bank == "on":
            raise ConfigError(
                f"model.memory_bank=on keeps the class-prompt table on the CPU, but model.class_prompts.source="
                f"{self.source} has no table to keep there (its parameters are trained on the device like the "
                f"others). Set model.memory_bank=off (or auto), or model.class_prompts.source=table.")
        if self.generated_residual and self.source != "generated":
            raise ConfigError(f"model.class_prompts.generated_residual applies to source=generated only, not "
                              f"source={self.source}; set model.class_prompts.generated_residual=false or "
                              f"model.class_prompts.source=generated.")


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    class_prompts: ClassPromptConfig = field(default_factory=ClassPromptConfig)
    embed_dim: int = 384
    """Embedding size E of the embedding head (and of the proxy head)."""
    head_init: HeadInit = "xavier"
    """xavier (Xavier-uniform weight, zero bias) | centered (the same weight; the bias is set once before
    training so that the training images' mean embedding before L2 normalisation is zero: features of one
    domain share a large common direction, which otherwise puts every embedding in a narrow cone). Applies
    to the embedding head and to the proxy head."""
    center_features: bool = False
    """Subtract the mean of each head's normalised features before its Linear: the batch mean in training
    (tracked as a running mean, used at inference), like BatchNorm's mean, and drop the Linear's bias: a
    batch's embeddings before L2 normalisation average zero, so they cannot drift into one narrow cone (on
    data whose images all look alike they otherwise do within a few steps, Proxy Anchor's collapsed state).
    The running means are stored in checkpoints."""
    bitfit: bool = True
    """Train every bias of the backbone."""
    full_finetune: bool = False
    """Train every backbone weight (the full fine-tuning baseline; the backbone still runs in eval mode)."""
    memory_bank: str = "auto"
    """auto | on | off: keep the class-prompt table and its optimiser state on the CPU and move only the
    batch's rows to the device each step. auto = on when the number of training classes is at least
    memory_bank_threshold. Results are identical either way (row-wise optimiser, see models/memory_bank.py).
    Only for model.class_prompts.source=table (auto is off for the other sources, on is an error)."""
    memory_bank_threshold: int = 1000
    """Number of training classes from which memory_bank=auto turns the bank on."""

    def validate(self, cfg: Config) -> None:
        """Check the subsections (in declaration order), then this section's own values."""
        for section in (self.backbone, self.prompts, self.proxy, self.adapter, self.lora, self.class_prompts):
            section.validate(cfg)
        if self.embed_dim < 1:
            raise ConfigError("model.embed_dim must be >= 1")
        _choice("model.memory_bank", self.memory_bank, ["auto", "on", "off"])
        if self.memory_bank_threshold < 1:
            raise ConfigError("model.memory_bank_threshold must be >= 1")
        if self.full_finetune and self.lora.rank > 0:
            raise ConfigError("model.full_finetune trains the qkv weights themselves; LoRA on top of them is "
                              "redundant and could not be merged. Set model.lora.rank=0 or model.full_finetune=false.")


@dataclass
class LossConfig:
    """The proxy loss: Proxy Anchor (the paper's) or normalised softmax."""

    name: str = "proxy_anchor"
    """proxy_anchor (Kim et al. 2020, the paper's loss) | norm_softmax (cross-entropy over cosine similarities /
    temperature, Zhai & Wu 2019: its value is largest when every embedding sits at one point, so it cannot
    be lowered by collapsing, which Proxy Anchor can on data with many similar classes)"""
    temperature: float = 0.05
    """norm_softmax: softmax temperature."""
    alpha: float = 32.0
    """Proxy Anchor scale alpha applied to the cosine similarities."""
    delta: float = 0.1
    """Proxy Anchor margin delta."""
    proxy_range: ProxyRange = "both_all"
    """both_all (all classes' proxies) | in_batch (the batch's classes only)"""
    normalization: Normalization = "standard"
    """standard (positive term / #proxies with positives, negative term / #proxies) | authors (both / C)"""

    def validate(self, cfg: Config) -> None:
        """Check this section's values (loss.name is checked against the registry by Config.validate)."""
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"loss.temperature must be a positive number, got {self.temperature}")
        _positive(("loss.alpha", self.alpha))
        if not math.isfinite(self.delta):
            raise ConfigError(f"loss.delta must be a finite number, got {self.delta}")


@dataclass
class OptimConfig:
    optimizer: OptimizerName = "sgd"
    """sgd (momentum) | adamw"""
    lr: float = 5e-3
    """Learning rate of everything trained except the proxy bias (prompts, heads, biases, GRU, class prompts;
    adapter/LoRA/backbone weights in the baselines)."""
    lr_proxy: float = 0.1
    """Learning rate of the proxy bias P_bias (a second optimiser of the same type)."""
    weight_decay: float = 1e-6
    """Weight decay of both optimisers."""
    momentum: float = 0.9
    """SGD momentum (optimizer=sgd)."""
    scheduler: SchedulerName = "cosine"
    """cosine | constant"""
    t_max: int = 0
    """Cosine period in epochs (0 = the number of epochs)."""
    lr_min: float = 1e-8
    """Learning rate at the end of the cosine period."""
    grad_clip: float = 0.0
    """Clip the global gradient norm (0 = off)."""
    backbone_lr_scale: float = 1.0
    """Learning rate of the backbone-side parameters (shared prompts, BitFit biases, adapters, LoRA, the full
    backbone) as a multiple of optim.lr; heads, GRU and class prompts keep optim.lr."""
    head_warmup_epochs: float = 0.0
    """For the first N epochs (fractions allowed) the backbone's trainable parts (shared prompts, BitFit biases,
    adapters, LoRA, full fine-tuning) get no update; the heads, the proxies and the proxy generator train, so the
    proxies settle before the features move (Proxy Anchor's warm-up epochs). 0 = off, as in the original method."""
    warmup_epochs: float = 0.0
    """Linear learning-rate warmup over the first N epochs (fractions allowed), step by step, for every parameter
    group (0 = off, as in the original method)."""

    def validate(self, cfg: Config) -> None:
        """Check this section's values; the warm-up lengths are bounded by cfg.train.epochs."""
        if not (math.isfinite(self.backbone_lr_scale) and self.backbone_lr_scale > 0):
            raise ConfigError(f"optim.backbone_lr_scale must be a positive number, got {self.backbone_lr_scale}")
        epochs = cfg.train.epochs
        if not 0.0 <= self.head_warmup_epochs <= epochs:
            raise ConfigError(f"optim.head_warmup_epochs must be in [0, train.epochs={epochs}], got "
                              f"{self.head_warmup_epochs}")
        if not 0.0 <= self.warmup_epochs <= epochs:
            raise ConfigError(f"optim.warmup_epochs must be in [0, train.epochs={epochs}], got "
                              f"{self.warmup_epochs}")
        _positive(("optim.lr", self.lr), ("optim.lr_proxy", self.lr_proxy))
        _non_negative(("optim.weight_decay", self.weight_decay), ("optim.lr_min", self.lr_min),
                      ("optim.grad_clip", self.grad_clip))
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise ConfigError(f"optim.momentum must be in [0, 1), got {self.momentum}")
        _at_least(("optim.t_max", self.t_max, 0))


@dataclass
class EvalConfig:
    recall_ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """The K of Recall@K, e.g. [1, 10, 100, 1000] for SOP."""
    every: int = 0
    """Evaluate on the test split every N epochs (0 = only after training)."""
    batch_size: int = 128
    """Images per forward pass when embedding the evaluation splits."""
    before_training: bool = False
    """Also evaluate the frozen backbone's features before training."""
    select_metric: str = "map@r"
    """Metric on the validation split (data.val_ratio > 0) that picks the 'best' checkpoint."""

    def validate(self, cfg: Config) -> None:
        """Check this section's values; select_metric is one of the metrics that recall_ks makes."""
        if not self.recall_ks or min(self.recall_ks) < 1:
            raise ConfigError("eval.recall_ks must be a non-empty list of positive integers")
        _at_least(("eval.batch_size", self.batch_size, 1), ("eval.every", self.every, 0))
        metrics = ["map@r", "r_precision"] + [f"recall@{k}" for k in self.recall_ks]
        _choice("eval.select_metric", self.select_metric, metrics)


@dataclass
class TrainConfig:
    epochs: int = 15
    """Number of training epochs."""
    seed: int = 0
    """Random seed (initialisation, batch sampling, augmentation)."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N | mps"""
    precision: Precision = "auto"
    """auto (bf16 on CPU, fp16 on CUDA) | bf16 | fp16 | fp32"""
    output_dir: str = "runs"
    """Folder in which run directories are created (OUTPUT_DIR/RUN_NAME)."""
    run_name: str = ""
    """Name of the run directory (empty = <dataset>-<date>-<time>)."""
    progress: bool = True
    """Show progress bars."""
    deterministic: bool = False
    """Deterministic algorithms (bitwise-reproducible on CPU; slower on GPU)."""
    max_nonfinite_steps: int = 20
    """Abort after this many consecutive steps with a non-finite loss (each one is skipped)."""
    keep_checkpoints: int = 1
    """How many per-epoch resume checkpoints to keep besides 'last' (0 = only 'last')."""
    tensorboard: bool = True
    """Write TensorBoard event files: per-epoch values and per-step loss and learning rates (needs the
    tensorboard package: pip install "promptdml[viz]"; without it the run warns once and goes on)."""
    plot: bool = True
    """Draw training.png, the loss and metrics over the epochs (needs matplotlib: pip install "promptdml[viz]";
    without it the run warns once and goes on)."""
    log_steps: bool = False
    """Also write steps.csv: one row per optimisation step (epoch, step, loss, lr, lr_proxy)."""
    compile: bool = False
    """torch.compile (inductor) the prompted backbone's blocks for training steps (docs/performance.md): one-off
    compile time at the first steps, then faster steps; evaluation stays eager. Where the compiler is not
    available (e.g. no C++ toolchain) one warning and training continues eager."""

    def validate(self, cfg: Config) -> None:
        """Check this section's values."""
        if self.epochs < 1:
            raise ConfigError("train.epochs must be >= 1")
        _at_least(("train.keep_checkpoints", self.keep_checkpoints, 0),
                  ("train.max_nonfinite_steps", self.max_nonfinite_steps, 1))
        check_device_name(self.device, "train.device")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> Config:
        """Check values that a type alone cannot express; raise ConfigError with the fix.

        The choices first (the registered datasets and losses, then every ``Literal``-annotated key), then each
        section's own ``validate`` in declaration order (a section reads other sections from this config)."""
        from promptdml.registry import DATASETS, LOSSES

        _choice("data.dataset", self.data.dataset, DATASETS.names())
        _choice("loss.name", self.loss.name, LOSSES.names())
        for key, options in _literal_keys(Config):  # every Literal-annotated key, in declaration order
            _choice(key, _get_key(self, key), list(options))
        for section in (self.data, self.model, self.loss, self.optim, self.eval, self.train):
            section.validate(self)
        return self


def _positive(*items: tuple[str, float]) -> None:
    """Each (key, value) is a finite number > 0 (values that would only fail during training)."""
    for key, value in items:
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{key} must be a finite number > 0, got {value}")


def _non_negative(*items: tuple[str, float]) -> None:
    """Each (key, value) is a finite number >= 0."""
    for key, value in items:
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{key} must be a finite number >= 0, got {value}")


def _at_least(*items: tuple[str, int, int]) -> None:
    """Each (key, value, low) has value >= low."""
    for key, value, low in items:
        if value < low:
            raise ConfigError(f"{key} must be >= {low}, got {value}")


DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device_name(name: str, key: str = "--device") -> None:
    """``auto | cpu | cuda | cuda:N | mps`` (whether it exists here is checked when the device is used)."""
    if not DEVICE_PATTERN.match(str(name)):
        close = difflib.get_close_matches(str(name), ["auto", "cpu", "cuda", "cuda:0", "mps"], n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{key} = '{name}' is not a device; use auto, cpu, cuda, cuda:N (N = 0, 1, ...) or mps.{hint}")


def _literal_keys(cls: type, prefix: str = "") -> list[tuple[str, tuple[str, ...]]]:
    """(dotted key, choices) of every field annotated with a ``Literal``, in declaration order."""
    out: list[tuple[str, tuple[str, ...]]] = []
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _literal_keys(tp, prefix + f.name + ".")
        elif typing.get_origin(tp) is Literal:
            out.append((prefix + f.name, typing.get_args(tp)))
    return out


def choices_of(key: str) -> tuple[str, ...] | None:
    """The allowed values of a ``Literal``-annotated key (e.g. ``train.precision``), else None."""
    return dict(_literal_keys(Config)).get(key)


def _get_key(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _choice(key: str, value: str, options: list[str]) -> None:
    if value not in options:
        close = difflib.get_close_matches(str(value), options, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{key} = '{value}' is not one of {options}.{hint}")


# --------------------------------------------------------------------------------------------------
# dict <-> dataclass


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as nested plain dicts (YAML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is Literal:  # a string here; whether it is one of the choices is checked by Config.validate
        return _coerce(value, str, key)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, inner, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        full = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, full + "."))
        else:
            keys.append(full)
    return keys


def _unknown_key_error(key: str, valid: list[str], where: str) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    close += [v for v in valid if v.rsplit(".", 1)[-1] == leaf and v not in close]
    close += [v for v in difflib.get_close_matches(leaf, [v.rsplit(".", 1)[-1] for v in valid], n=3)
              for v in [x for x in valid if x.endswith("." + v) or x == v] if v not in close]
    hint = f" Closest valid keys: {', '.join(close[:4])}." if close else ""
    return ConfigError(f"unknown config key '{key}' in {where}.{hint} "
                       "Every key: docs/configuration.md.")


def _apply(cfg: Any, data: dict[str, Any], prefix: str, where: str) -> None:
    hints = _field_types(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise _unknown_key_error(key, _all_keys(Config), where)
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, dict):
                raise ConfigError(f"{key} is a section; give it as a mapping of keys, not {v!r}")
            _apply(getattr(cfg, k), v, key + ".", where)
        else:
            setattr(cfg, k, _coerce(v, tp, key))


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` -> (key, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value, e.g. optim.lr=0.01")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set one dotted key on a Config (strict)."""
    node: Any = cfg
    parts = key.split(".")
    for i, p in enumerate(parts):
        names = {f.name for f in dataclasses.fields(node)}
        if p not in names:
            raise _unknown_key_error(key, _all_keys(Config), "the command line")
        tp = _field_types(type(node))[p]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"{key} is a section; set one of its keys, e.g. {key}.{dataclasses.fields(tp)[0].name}=...")
            setattr(node, p, _coerce(value, tp, key))
        else:
            if not dataclasses.is_dataclass(tp):
                raise _unknown_key_error(key, _all_keys(Config), "the command line")
            node = getattr(node, p)


def from_dict(data: dict[str, Any] | None, where: str = "a dict") -> Config:
    cfg = Config()
    data = unwrap_desc_value(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping of config keys, got {type(data).__name__}")
    if is_authors_format(data):
        data = authors_to_nested(data)
    _apply(cfg, data, "", where)
    return cfg


CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The shipped configs (``demo``, ``cub200_small``, ...), installed with the package."""


def shipped_configs() -> list[str]:
    """Names of the shipped configs, sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config(name: str | Path | None) -> Path | None:
    """A YAML path, or the name of a shipped config (``cub200_small`` -> the packaged cub200_small.yaml)."""
    if name is None or not str(name).strip():
        return None
    path = Path(name).expanduser()
    if path.is_file():
        return path
    text = str(name)
    if path.parent == Path(".") or path.parent.name == "configs":  # a bare name, or configs/<name>.yaml
        stem = path.name if path.suffix in (".yaml", ".yml") else path.name + ".yaml"
        shipped = CONFIG_DIR / stem
        if shipped.is_file():
            return shipped
    close = difflib.get_close_matches(Path(text).stem, shipped_configs(), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    what = (f"config file '{path}' does not exist" if path.suffix in (".yaml", ".yml") or path.parent != Path(".")
            else f"config '{text}' is neither a file nor a shipped config")
    raise ConfigError(f"{what}.{hint} Pass a YAML file or the name of a shipped config: "
                      f"{', '.join(shipped_configs())}")


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None,
                validate: bool = True) -> Config:
    """Load a YAML file (either form) or a shipped config by name (``"demo"``, ``"cub200_small"``), then apply
    overrides (``["optim.lr=0.01"]`` or ``{"optim.lr": 0.01}``). No path: the defaults."""
    data: dict[str, Any] = {}
    where = "defaults"
    path = resolve_config(path)
    if path:
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
        where = str(path)
    cfg = from_dict(data, where)
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in (overrides or [])]
    for k, v in items:
        set_key(cfg, k, v)
    return cfg.validate() if validate else cfg


def save_config(cfg: Config, path: str | Path) -> None:
    from promptdml.files import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe_keys() -> list[tuple[str, str, Any, str]]:
    """Every leaf key as (dotted name, type, default, help), in declaration order, for docs and --help.

    The help text is the field's docstring (the string literal right after the field in its dataclass), the
    one source (data.dataset, which has none, lists the registered datasets). The type is written as annotated
    (``int``, ``list[int]``); the default is that of a fresh :class:`Config`. Covers nested sections
    (``model.backbone``, ``model.adapter``, ``model.lora``, ...) at any depth.
    """
    import ast
    import inspect

    def field_docs(cls: type) -> dict[str, str]:
        try:
            tree = ast.parse(inspect.getsource(cls))
        except (OSError, TypeError, SyntaxError):
            return {}
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        docs = {}
        for node, nxt in zip(body, body[1:], strict=False):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
        return docs

    def registry_choices(key: str) -> str:
        from promptdml.registry import DATASETS

        return " | ".join(DATASETS.names()) if key == "data.dataset" else ""

    def type_name(tp: Any) -> str:
        if typing.get_origin(tp) is Literal:
            return "one of " + ", ".join(typing.get_args(tp))
        if typing.get_origin(tp) is None and isinstance(tp, type):
            return tp.__name__
        return str(tp).replace("typing.", "")

    rows: list[tuple[str, str, Any, str]] = []

    def walk(cls: type, obj: Any, prefix: str) -> None:
        docs = field_docs(cls)
        hints = _field_types(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            key = prefix + f.name
            if dataclasses.is_dataclass(tp):
                walk(tp, getattr(obj, f.name), key + ".")
            else:
                help_text = docs.get(f.name) or registry_choices(key)
                rows.append((key, type_name(tp), getattr(obj, f.name), help_text))

    walk(Config, Config(), "")
    return rows
