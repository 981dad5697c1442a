"""Data: classification sets and instruction sets from builtin and user sources, and client partitions."""

from fedtreelora.data.instructions import (
    BUILTIN_INSTRUCTION_SOURCES,
    EVALS_NLG_DEFAULT,
    EVALS_TASKS,
    InstructionColumns,
    InstructionDataset,
    InstructionSet,
    load_instructions,
)
from fedtreelora.data.partition import ClientData, dirichlet_partition, task_partition
from fedtreelora.data.sources import BUILTIN_SOURCES, load_classification
from fedtreelora.data.types import ClassificationDataset, LabeledTexts

__all__ = [
    "BUILTIN_INSTRUCTION_SOURCES",
    "BUILTIN_SOURCES",
    "EVALS_NLG_DEFAULT",
    "EVALS_TASKS",
    "ClassificationDataset",
    "ClientData",
    "InstructionColumns",
    "InstructionDataset",
    "InstructionSet",
    "LabeledTexts",
    "dirichlet_partition",
    "load_classification",
    "load_instructions",
    "task_partition",
]
