from promptdml.models.backbone import BackboneError, PromptedViT, create_backbone
from promptdml.models.model import PromptDMLModel, count_parameters, create_model, format_parameter_report

__all__ = ["BackboneError", "PromptedViT", "create_backbone", "PromptDMLModel", "count_parameters",
           "create_model", "format_parameter_report"]
