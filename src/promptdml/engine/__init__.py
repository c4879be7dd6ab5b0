from promptdml.checkpoint import load_model, save_checkpoint
from promptdml.engine.evaluator import embed_records, evaluate, evaluate_run
from promptdml.engine.trainer import Trainer, TrainingError, TrainingInterrupted, TrainResult, resume, train

__all__ = ["load_model", "save_checkpoint", "embed_records", "evaluate", "evaluate_run", "Trainer", "TrainingError",
           "TrainResult", "TrainingInterrupted", "resume", "train"]
