"""The YAML format of the original research code: flat keys, optionally ``key: {desc: ..., value: ...}``.

Its files load unchanged: :func:`promptdml.config.from_dict` recognises the format
(:func:`is_authors_format`), unwraps the ``{desc, value}`` entries and maps the flat keys onto the nested
:class:`~promptdml.config.Config` keys (:data:`AUTHORS_KEYS`; the mapping is listed in
docs/configuration.md).
"""

from __future__ import annotations

from typing import Any

__all__ = ["AUTHORS_BACKBONES", "AUTHORS_IGNORED", "AUTHORS_KEYS", "authors_to_nested", "is_authors_format",
           "unwrap_desc_value"]


def unwrap_desc_value(obj: Any) -> Any:
    """Turn the authors' ``key: {desc: ..., value: ...}`` entries into plain values, recursively."""
    if isinstance(obj, dict):
        if "value" in obj and set(obj) <= {"desc", "value"}:
            return unwrap_desc_value(obj["value"])
        return {k: unwrap_desc_value(v) for k, v in obj.items()}
    return obj


# Authors' flat keys -> our nested keys (their YAML files load unchanged).
AUTHORS_KEYS: dict[str, str] = {
    "batch_size": "data.batch_size",
    "samples_per_class": "data.samples_per_class",
    "dataset": "data.dataset",
    "decay": "optim.weight_decay",
    "embed_dim": "model.embed_dim",
    "lr": "optim.lr",
    "lr_proxy": "optim.lr_proxy",
    "lr_cosine_length": "optim.t_max",
    "lr_cosine_min": "optim.lr_min",
    "n_epochs": "train.epochs",
    "num_prompt": "model.prompts.num_prompt",
    "prompt_depth": "model.prompts.prompt_depth",
    "prompt_block_step": "model.prompts.prompt_block_step",
    "num_p_prompt": "model.prompts.num_p_prompt",
    "p_prompt_depth": "model.prompts.p_prompt_depth",
    "prompt_p_block_step": "model.prompts.prompt_p_block_step",
    "optim": "optim.optimizer",
    "proxy_bias_ratio": "model.proxy.proxy_bias_ratio",
    "proxy_data_range": "loss.proxy_range",
    "rnn_dropout": "model.proxy.rnn_dropout",
    "semantic_mix_type": "model.proxy.container_update",
    "proxy_mix_keep_ratio": "model.proxy.mix_keep_ratio",
    "vit_bitfit": "model.bitfit",
    "vit_proxy_net": "model.proxy.semantic",
    "pretrained_model": "model.backbone.name",
    "scheduler": "optim.scheduler",
    "mix_precision": "train.precision",
    "seed": "train.seed",
}
# Authors' keys with no effect here (behaviour fixed by the method or superseded); accepted and ignored.
AUTHORS_IGNORED = {
    "data_sampler", "eval_start", "feature_dropout", "negative_push", "proxy_mix_bias", "proxy_net_head",
    "same_p_scheduler", "vit_head", "vit_prompt", "no_train_metrics", "gpu", "source_path", "save_path",
}
AUTHORS_BACKBONES = {
    "vit_small_patch16_224_in21k": "vit_small_patch16_224.augreg_in21k",
    "vit_base_patch16_224_in21k": "vit_base_patch16_224.augreg_in21k",
}


def authors_to_nested(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for k, v in flat.items():
        if k in AUTHORS_IGNORED:
            continue
        if k not in AUTHORS_KEYS:
            from promptdml.config import Config, _all_keys, _unknown_key_error

            raise _unknown_key_error(k, sorted(AUTHORS_KEYS) + _all_keys(Config), "the authors'-format YAML")
        target = AUTHORS_KEYS[k]
        if target == "model.backbone.name":
            v = AUTHORS_BACKBONES.get(v, v)
        if target == "train.precision":
            v = "auto" if v else "fp32"
        if target == "optim.scheduler" and v not in ("cosine", "constant"):
            v = "constant" if v in ("none", None) else v
        node = nested
        *parents, leaf = target.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return nested


def is_authors_format(data: dict[str, Any]) -> bool:
    """Flat keys of the authors' files and none of our section names."""
    import dataclasses

    from promptdml.config import Config

    sections = {f.name for f in dataclasses.fields(Config)}
    return bool(data) and not (set(data) & sections) and bool(set(data) & (set(AUTHORS_KEYS) | AUTHORS_IGNORED))
