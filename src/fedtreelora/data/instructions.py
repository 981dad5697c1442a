"""Instruction data for generation: one record format (instruction, optional input, output, category,
task) and its loaders.

Sources:
- ``evals-nlg``: a builtin federation of short-answer tasks read from the installed ``evals`` package
  (never imported), two tasks per category, mirroring the paper's four FLAN categories (see
  :data:`EVALS_TASKS`);
- a JSON or JSONL file of records (the FLAN-style files of the FedDPA/FedALT code: a list of
  ``{"instruction", "input", "output", "category"}`` objects), a local dataset folder, or a Hugging Face
  hub id, with the column names mapped by the ``*_column`` options.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedtreelora.data.sources import _load_dataset_dict, _package_dir, _stratified_holdout
from fedtreelora.errors import ConfigError

if TYPE_CHECKING:
    from datasets import Dataset


@dataclass(frozen=True)
class InstructionSet:
    """Instruction examples, one list entry per example (all lists of length n).

    ``input`` may be empty (the instruction alone is the prompt). ``task`` groups examples into the
    units that clients are given (one task per client); ``category`` groups tasks for reporting
    (Text Edit, Struct2Text, ...).
    """

    instructions: list[str]
    inputs: list[str]
    outputs: list[str]
    categories: list[str]
    tasks: list[str]

    def __post_init__(self) -> None:
        n = len(self.instructions)
        for name in ("inputs", "outputs", "categories", "tasks"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{n} instructions but {len(getattr(self, name))} {name}")

    def __len__(self) -> int:
        return len(self.instructions)

    def subset(self, indices: np.ndarray) -> InstructionSet:
        """The examples at ``indices`` ((k,) integer array, in that order)."""
        idx = [int(i) for i in np.asarray(indices, dtype=np.int64)]
        return InstructionSet(
            instructions=[self.instructions[i] for i in idx],
            inputs=[self.inputs[i] for i in idx],
            outputs=[self.outputs[i] for i in idx],
            categories=[self.categories[i] for i in idx],
            tasks=[self.tasks[i] for i in idx],
        )

    def task_ids(self, task_names: list[str]) -> np.ndarray:
        """(n,) int64 index of each example's task in ``task_names``."""
        index = {t: i for i, t in enumerate(task_names)}
        return np.asarray([index[t] for t in self.tasks], dtype=np.int64)


@dataclass(frozen=True)
class InstructionDataset:
    """A named instruction set as two disjoint pools; clients train on ``train`` and are scored on
    ``validation`` (their own test split)."""

    name: str
    train: InstructionSet
    validation: InstructionSet

    @property
    def task_names(self) -> list[str]:
        """Tasks in order of first appearance in the train pool (the order clients are assigned in)."""
        return list(dict.fromkeys(self.train.tasks))

    def task_category(self, task: str) -> str:
        """The category of ``task`` (its most common one in the train pool)."""
        cats = [c for c, t in zip(self.train.categories, self.train.tasks, strict=True) if t == task]
        return max(set(cats), key=cats.count) if cats else ""


# ----------------------------------------------------------------------------------------------
# builtin federation from the `evals` package
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalsTask:
    """One task of the builtin federation: its category and its file under ``evals/registry/data``."""

    category: str
    file: str


EVALS_TASKS: dict[str, EvalsTask] = {
    # Text Edit
    "swap-words": EvalsTask("Text Edit", "swap-words/samples.jsonl"),
    "complex-replace": EvalsTask("Text Edit", "complex_replace_characters/samples.jsonl"),
    "decrypt-caesar": EvalsTask("Text Edit", "decrypt_caesar_cipher/samples.jsonl"),  # barely learns: see docs
    "anagrams": EvalsTask("Text Edit", "anagrams/samples.jsonl"),
    # Struct2Text
    "date-to-string": EvalsTask("Struct2Text", "imperial_date_to_string/samples.jsonl"),
    "poker-hand": EvalsTask("Struct2Text", "poker_hand_ranks/full_samples.jsonl"),
    "scale-modes": EvalsTask("Struct2Text", "music_theory_scale_modes/samples.jsonl"),
    # Sentiment
    "sarcasm": EvalsTask("Sentiment", "sarcasm/samples.jsonl"),
    "portuguese-sarcasm": EvalsTask("Sentiment", "portuguese-sarcasm/samples.jsonl"),
    "event-severity": EvalsTask("Sentiment", "event_categories/samples.jsonl"),
    # Reasoning
    "pararule": EvalsTask(
        "Reasoning",
        "pararule-plus-multi-step-deductive-reasoning/pararule-plus-multi-step-deductive-reasoning.jsonl",
    ),
    "theory-of-mind": EvalsTask("Reasoning", "theory_of_mind/tomi/test.jsonl"),
    "crepe": EvalsTask("Reasoning", "crepe/samples.jsonl"),
    "corr2cause": EvalsTask("Reasoning", "corr2cause/corr2cause.jsonl"),
}
"""Task name -> category and file, for ``data.tasks`` with ``data.dataset: evals-nlg``."""

EVALS_NLG_DEFAULT: tuple[str, ...] = (
    "swap-words",
    "complex-replace",
    "date-to-string",
    "poker-hand",
    "sarcasm",
    "portuguese-sarcasm",
    "pararule",
    "theory-of-mind",
)
"""The 8 tasks (two per category) of ``evals-nlg`` when ``data.tasks`` is not set."""

BUILTIN_INSTRUCTION_SOURCES: dict[str, str] = {
    "evals-nlg": "8 short-answer tasks from the `evals` package, two per category: Text Edit, Struct2Text, "
    "Sentiment, Reasoning (one task per client)",
}


def _chat_to_record(messages: list[dict[str, Any]], where: str) -> tuple[str, str]:
    """(instruction, input) of an ``evals`` chat row.

    The system messages form the instruction and the last user message the input; worked examples
    (user/assistant turns before it) are appended to the instruction as ``Input: ... / Output: ...``.
    A row without a system message has its last user message as the instruction and no input.
    """
    users = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"]
    system = [str(m.get("content", "")).strip() for m in messages if isinstance(m, dict) and m.get("role") == "system"]
    if not users:
        if not system:
            raise ConfigError(f"{where}: no user or system message in 'input'")
        # evals rows that put everything in system messages: the last one is the question
        return "\n".join(system[:-1]).strip() or system[-1], system[-1] if len(system) > 1 else ""
    last = users[-1]
    shots = []
    for m in messages[:last]:
        if m.get("role") == "user":
            shots.append(f"Input: {str(m.get('content', '')).strip()}")
        elif m.get("role") == "assistant":
            shots.append(f"Output: {str(m.get('content', '')).strip()}")
    question = str(messages[last].get("content", "")).strip()
    instruction = "\n".join(system + shots).strip()
    if not instruction:
        return question, ""
    return instruction, question


def _ideal(value: Any) -> str:
    """The reference answer: the string, or the first of several accepted answers ("" when none)."""
    if isinstance(value, list):
        value = value[0] if value else ""
    return "" if value is None else str(value).strip()


def read_evals_task(name: str) -> InstructionSet:
    """Every usable row of one task of :data:`EVALS_TASKS`, de-duplicated on (instruction, input)."""
    if name not in EVALS_TASKS:
        raise ConfigError(f"data.tasks: unknown evals task {name!r}; known tasks: {sorted(EVALS_TASKS)}")
    spec = EVALS_TASKS[name]
    path = _package_dir("evals") / "registry" / "data" / spec.file
    seen: set[tuple[str, str]] = set()
    rec: dict[str, list[str]] = {"instructions": [], "inputs": [], "outputs": []}
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            where = f"{path} row {line_no}"
            if not isinstance(row.get("input"), list):
                continue  # few-shot files hold prompt fragments, not rows
            instruction, text = _chat_to_record(row["input"], where)
            answer = _ideal(row.get("ideal"))
            if not answer or (instruction, text) in seen:
                continue  # a row without an answer cannot be scored
            seen.add((instruction, text))
            rec["instructions"].append(instruction)
            rec["inputs"].append(text)
            rec["outputs"].append(answer)
    n = len(rec["outputs"])
    return InstructionSet(**rec, categories=[spec.category] * n, tasks=[name] * n)


def _concat(parts: list[InstructionSet]) -> InstructionSet:
    return InstructionSet(
        instructions=[x for p in parts for x in p.instructions],
        inputs=[x for p in parts for x in p.inputs],
        outputs=[x for p in parts for x in p.outputs],
        categories=[x for p in parts for x in p.categories],
        tasks=[x for p in parts for x in p.tasks],
    )


def _hold_out(name: str, data: InstructionSet, fraction: float, seed: int) -> InstructionDataset:
    """Split into train/validation pools, ``fraction`` of every task to validation (fixed ``seed``)."""
    if len(data) < 2:
        raise ConfigError(f"{name}: only {len(data)} usable rows, too few to hold out a test split")
    tasks = list(dict.fromkeys(data.tasks))
    train_idx, val_idx = _stratified_holdout(data.task_ids(tasks), fraction, seed)
    return InstructionDataset(name=name, train=data.subset(train_idx), validation=data.subset(val_idx))


def load_evals_nlg(tasks: list[str] | None, validation_fraction: float, split_seed: int) -> InstructionDataset:
    """The builtin ``evals-nlg`` federation's pools (tasks in the given order, default :data:`EVALS_NLG_DEFAULT`)."""
    names = list(EVALS_NLG_DEFAULT if tasks is None else tasks)
    if len(set(names)) != len(names):
        raise ConfigError(f"data.tasks lists a task twice: {names}")
    data = _concat([read_evals_task(t) for t in names])
    return _hold_out("evals-nlg", data, validation_fraction, split_seed)


# ----------------------------------------------------------------------------------------------
# files, folders and the hub
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstructionColumns:
    """Column names of the record fields in a file or hub dataset.

    ``instruction`` and ``output`` must exist. ``input`` may be absent (every input is then empty);
    ``category`` and ``task`` may be absent or None: a missing task column makes the category the task,
    a missing category makes the task the category; with neither, all rows form one task.
    """

    instruction: str = "instruction"
    input: str | None = "input"
    output: str = "output"
    category: str | None = "category"
    task: str | None = None


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _records(name: str, split: str, ds: Dataset, cols: InstructionColumns) -> InstructionSet:
    """One split as an InstructionSet; rows with an empty instruction or output are dropped."""
    present = set(ds.column_names)
    for option, required in (("instruction_column", cols.instruction), ("output_column", cols.output)):
        if required not in present:
            raise ConfigError(
                f"{name} (split {split!r}): no column {required!r} for data.{option}; the data has columns "
                f"{sorted(present)}. Set data.{option} to one of them."
            )
    if len(ds) == 0:
        raise ConfigError(f"{name}: split {split!r} has no rows")
    n = len(ds)

    def column(col: str | None) -> list[str]:
        return [_text(v) for v in ds[col]] if col is not None and col in present else [""] * n

    instructions, inputs, outputs = column(cols.instruction), column(cols.input), column(cols.output)
    categories, tasks = column(cols.category), column(cols.task)
    categories = [c or t or "all" for c, t in zip(categories, tasks, strict=True)]
    tasks = [t or c for t, c in zip(tasks, categories, strict=True)]
    keep = [i for i in range(n) if instructions[i] and outputs[i]]
    if not keep:
        raise ConfigError(
            f"{name}: split {split!r} has no row with a non-empty {cols.instruction!r} and {cols.output!r}"
        )
    return InstructionSet(instructions, inputs, outputs, categories, tasks).subset(np.asarray(keep))


def load_instructions(
    source: str,
    *,
    columns: InstructionColumns = InstructionColumns(),
    tasks: list[str] | None = None,
    hub_config: str | None = None,
    train_split: str = "train",
    validation_split: str | None = None,
    validation_fraction: float = 0.2,
    split_seed: int = 0,
) -> InstructionDataset:
    """Load ``source`` as an :class:`InstructionDataset` with disjoint train and test pools.

    ``source`` is ``evals-nlg`` (builtin), a .json/.jsonl/.csv/.parquet file, a local dataset folder or a
    hub id (read with Hugging Face ``datasets``). The test pool is ``validation_split`` if given, else the
    source's ``validation`` or ``test`` split, else a ``validation_fraction`` share of every task held out
    with ``split_seed``. ``tasks`` keeps only those tasks, in that order (the order clients are assigned in).

    Raises:
        ConfigError: empty or unreadable file, missing column (the message names the ``data.*_column``
            option to set), unknown split or task.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    if source in BUILTIN_INSTRUCTION_SOURCES:
        if validation_split is not None or train_split != "train":
            raise ConfigError(
                f"builtin {source!r} has only a train split; leave data.train_split/validation_split unset"
            )
        return load_evals_nlg(tasks, validation_fraction, split_seed)
    name, splits = _load_dataset_dict(source, hub_config)
    available = list(splits.keys())
    if train_split not in splits:
        raise ConfigError(f"{name}: no split {train_split!r} (data.train_split); splits: {available}")
    if validation_split is not None and validation_split not in splits:
        raise ConfigError(f"{name}: no split {validation_split!r} (data.validation_split); splits: {available}")
    if validation_split is None:
        validation_split = next((s for s in ("validation", "test") if s in splits and s != train_split), None)
    train = _select(name, _records(name, train_split, splits[train_split], columns), tasks)
    if validation_split is None:
        return _hold_out(name, train, validation_fraction, split_seed)
    test = _select(name, _records(name, validation_split, splits[validation_split], columns), tasks)
    return InstructionDataset(name=name, train=train, validation=test)


def _select(name: str, data: InstructionSet, tasks: list[str] | None) -> InstructionSet:
    """Only the rows of ``tasks`` (grouped task by task, in that order); all rows when None."""
    if tasks is None:
        return data
    present = set(data.tasks)
    missing = [t for t in tasks if t not in present]
    if missing:
        raise ConfigError(
            f"{name}: data.tasks names {missing}, which the data does not hold; its tasks: {sorted(present)}"
        )
    order = {t: i for i, t in enumerate(tasks)}
    keep = sorted((i for i, t in enumerate(data.tasks) if t in order), key=lambda i: (order[data.tasks[i]], i))
    return data.subset(np.asarray(keep, dtype=np.int64))
