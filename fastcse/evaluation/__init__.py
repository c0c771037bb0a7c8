"""Evaluation as in the SimCSE paper: STS tasks (Spearman x100), alignment / uniformity / isotropy,
and loading models from fastcse, sentence-transformers and Hugging Face folders.

The command line is ``python -m fastcse.evaluate``; export lives in :mod:`fastcse.export`.
"""

from fastcse.models.folders import MODEL_KINDS, ModelFolderError, detect_model_kind

from .geometry import (Geometry, alignment, evaluate_geometry, isotropy, mean_cosine, plot_alignment_uniformity,
                       uniformity)
from .loading import load_encoder
from .sts import (TASKS, DataFormatError, EmbeddingCache, STSData, STSResults, TaskResult, evaluate_sts,
                  evaluate_stsb, evaluation_length, load_stsb, load_task, load_tasks, read_senteval_sts, read_sick, read_stsb,
                  spearman)

__all__ = [
    "MODEL_KINDS", "TASKS", "DataFormatError", "EmbeddingCache", "Geometry", "ModelFolderError", "STSData",
    "STSResults", "TaskResult", "alignment", "detect_model_kind", "evaluate_geometry", "evaluate_sts",
    "evaluate_stsb", "evaluation_length", "isotropy", "load_encoder", "load_stsb", "load_task", "load_tasks", "mean_cosine",
    "plot_alignment_uniformity", "read_senteval_sts", "read_sick", "read_stsb", "spearman", "uniformity",
]
