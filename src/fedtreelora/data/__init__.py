"""Data: classification sets and instruction sets from builtin and user sources, client partitions, and
federations with planted groups."""

from fedtreelora.data.groups import (
    DriftSpec,
    GroupSpec,
    SourceSpec,
    configured_dataset_name,
    drift_field,
    drift_labels,
    group_specs,
    load_group_sources,
    partition_groups,
    planted_groups,
)
from fedtreelora.data.instructions import (
    BUILTIN_INSTRUCTION_SOURCES,
    EVALS_NLG_DEFAULT,
    EVALS_TASKS,
    InstructionColumns,
    InstructionDataset,
    InstructionSet,
    load_instructions,
)
from fedtreelora.data.partition import ClientData, LabelDrift, dirichlet_partition, task_partition
from fedtreelora.data.sources import BUILTIN_SOURCES, load_classification
from fedtreelora.data.types import ClassificationDataset, LabeledTexts

__all__ = [
    "BUILTIN_INSTRUCTION_SOURCES",
    "BUILTIN_SOURCES",
    "EVALS_NLG_DEFAULT",
    "EVALS_TASKS",
    "ClassificationDataset",
    "ClientData",
    "DriftSpec",
    "GroupSpec",
    "InstructionColumns",
    "InstructionDataset",
    "InstructionSet",
    "LabelDrift",
    "LabeledTexts",
    "SourceSpec",
    "configured_dataset_name",
    "dirichlet_partition",
    "drift_field",
    "drift_labels",
    "group_specs",
    "load_group_sources",
    "load_classification",
    "load_instructions",
    "partition_groups",
    "planted_groups",
    "task_partition",
]
