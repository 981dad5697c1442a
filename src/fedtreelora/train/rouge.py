"""ROUGE and exact match of generated answers against references (Google's ``rouge-score``)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

ROUGE_TYPES = ("rouge1", "rougeL")


@lru_cache(maxsize=2)
def _scorer(use_stemmer: bool) -> Any:  # rouge_score ships no type information
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)


def normalize_answer(text: str) -> str:
    """Lower case, surrounding whitespace and punctuation stripped, inner whitespace collapsed."""
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .,;:!?\"'")


def rouge_scores(
    predictions: Sequence[str], references: Sequence[str], *, use_stemmer: bool = False
) -> dict[str, float]:
    """Mean ROUGE-1 and ROUGE-L F1 (each in [0, 1]) and exact match over pairs.

    ROUGE follows ``rouge-score``: text is lower-cased and split on anything that is not a letter or
    digit (so punctuation is ignored), F1 of unigram overlap (rouge1) and of the longest common
    subsequence (rougeL). Exact match compares :func:`normalize_answer` forms. An empty list gives NaN.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return {"rouge1": float("nan"), "rougeL": float("nan"), "exact_match": float("nan")}
    scorer = _scorer(use_stemmer)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    exact = 0
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)  # (target, prediction)
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
        exact += normalize_answer(pred) == normalize_answer(ref)
    n = len(predictions)
    return {"rouge1": totals["rouge1"] / n, "rougeL": totals["rougeL"] / n, "exact_match": exact / n}
