from promptdml.models.backbone import BackboneError, PromptedViT, create_backbone
from promptdml.models.memory_bank import LazyRowOptimizer, RowwiseOptimizer
from promptdml.models.model import PromptDMLModel, count_parameters, create_model, format_parameter_report
from promptdml.models.peft import LoRA, MergeError, ParallelAdapters

__all__ = ["BackboneError", "PromptedViT", "create_backbone", "PromptDMLModel", "count_parameters",
           "create_model", "format_parameter_report", "LoRA", "MergeError", "ParallelAdapters", "RowwiseOptimizer",
           "LazyRowOptimizer"]
