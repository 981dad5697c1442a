"""Instruction tuning of causal LMs: prompts, response-only labels, padded batches, batched generation.

A training example is ``prompt + response`` where the prompt is the model's chat template applied to
the instruction (and input) with the assistant turn opened, and the response is the reference answer
with the template's end-of-turn. Only response tokens carry labels; prompt and padding are -100.

Batches are left-padded, so every row's response ends at the right edge: the LM head (a vocabulary-
sized matmul, most of a small model's cost) then runs only over the last positions that hold answer
tokens (``logits_to_keep``), not over the prompts.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from fedtreelora.train.settings import GenerationSettings

IGNORE_INDEX = -100
"""Label of tokens that do not count in the loss (prompt, padding)."""

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
"""Prompt of a model without a chat template (the Alpaca format used by FedDPA/FedALT-style code)."""


@dataclass(frozen=True)
class EncodedInstructions:
    """Token ids of instruction examples, unpadded; all lists have one entry per example.

    Attributes:
        input_ids: prompt then response tokens (training input).
        labels: same length as ``input_ids``; IGNORE_INDEX on the prompt, the token id on the response.
        prompt_ids: the prompt alone (generation input); a prefix of ``input_ids``.
        references: the reference answers (text), for ROUGE.
    """

    input_ids: list[list[int]]
    labels: list[list[int]]
    prompt_ids: list[list[int]]
    references: list[str]

    def __len__(self) -> int:
        return len(self.input_ids)


def _chat(tokenizer: PreTrainedTokenizerBase, instruction: str, text: str, answer: str | None) -> str:
    """The chat-template rendering: the instruction as the system turn and the input as the user turn
    (the instruction as the user turn when there is no input, or the template takes no system turn)."""
    tail = [] if answer is None else [{"role": "assistant", "content": answer}]
    attempts = [[{"role": "user", "content": instruction}]]
    if text:
        attempts = [
            [{"role": "system", "content": instruction}, {"role": "user", "content": text}],
            [{"role": "user", "content": f"{instruction}\n\n{text}"}],
        ]
    error: Exception | None = None
    for messages in attempts:
        try:
            # tokenize=False returns the rendered text; the annotation covers every mode (ids, BatchEncoding).
            return cast(
                str,
                tokenizer.apply_chat_template(messages + tail, tokenize=False, add_generation_prompt=answer is None),
            )
        except Exception as exc:  # e.g. a template that rejects the system role
            error = exc
    raise ValueError(f"the tokenizer's chat template cannot render this example: {error}")


def prompt_and_response(
    tokenizer: PreTrainedTokenizerBase, instruction: str, text: str, output: str
) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the response (answer plus end of turn), with no truncation.

    With a chat template: the prompt is the conversation up to the opened assistant turn; the response
    is what the full conversation adds after it (e.g. ``Paris<|im_end|>\\n``). Without one: the Alpaca
    prompt (with the tokenizer's BOS) and ``output + EOS``.
    """
    if tokenizer.chat_template:
        prompt = _chat(tokenizer, instruction, text, None)
        full = _chat(tokenizer, instruction, text, output)
        if not full.startswith(prompt):
            raise ValueError("the chat template renders the prompt differently with and without the answer")
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
        return prompt_ids, response_ids
    prompt = ALPACA_PROMPT.format(
        with_input=", paired with an input that provides further context" if text else "",
        instruction=instruction,
        input_block=f"### Input:\n{text}\n\n" if text else "",
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(output, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = [*response_ids, tokenizer.eos_token_id]
    return prompt_ids, response_ids


def encode_instructions(
    tokenizer: PreTrainedTokenizerBase,
    instructions: Sequence[str],
    inputs: Sequence[str],
    outputs: Sequence[str],
    *,
    max_length: int,
    max_new_tokens: int,
) -> EncodedInstructions:
    """Tokenize once per run: prompts keep their last ``max_length - max_new_tokens`` tokens (the
    opened assistant turn stays; the start of a long instruction goes), responses their first
    ``max_new_tokens``; so every training row fits ``max_length`` and generation sees the same prompt.
    """
    budget = max_length - max_new_tokens
    if budget < 1:
        raise ValueError(
            f"model.max_length ({max_length}) must exceed generation.max_new_tokens ({max_new_tokens}) to leave "
            "room for the prompt"
        )
    input_ids, labels, prompts = [], [], []
    for instruction, text, output in zip(instructions, inputs, outputs, strict=True):
        prompt, response = prompt_and_response(tokenizer, instruction, text, output)
        prompt, response = prompt[-budget:], response[:max_new_tokens]
        input_ids.append(prompt + response)
        labels.append([IGNORE_INDEX] * len(prompt) + response)
        prompts.append(prompt)
    return EncodedInstructions(input_ids, labels, prompts, [str(o) for o in outputs])


def pad_rows(rows: Sequence[Sequence[int]], value: int, *, left: bool) -> torch.Tensor:
    """(len(rows), longest) int64 tensor of ``rows`` padded with ``value`` on the left or the right."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            if left:
                out[i, width - len(row) :] = torch.as_tensor(row)
            else:
                out[i, : len(row)] = torch.as_tensor(row)
    return out


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """(rows, T) positions counted from each row's first real token (0 on left padding), so a left-padded
    row sees the positions it would see alone."""
    return (mask.long().cumsum(dim=-1) - 1).clamp_min(0)


def collate_instructions(
    tokenizer: PreTrainedTokenizerBase, parts: Sequence[tuple[EncodedInstructions, np.ndarray]]
) -> dict[str, torch.Tensor]:
    """A left-padded training batch of the examples ``idx`` of each part, part after part.

    Returns input_ids, attention_mask, position_ids and labels, each (rows, T); padded labels are
    IGNORE_INDEX.
    """
    ids = [data.input_ids[i] for data, idx in parts for i in idx]
    labels = [data.labels[i] for data, idx in parts for i in idx]
    mask = pad_rows([[1] * len(r) for r in ids], 0, left=True)
    return {
        "input_ids": pad_rows(ids, tokenizer.pad_token_id, left=True),
        "attention_mask": mask,
        "position_ids": position_ids(mask),
        "labels": pad_rows(labels, IGNORE_INDEX, left=True),
    }


def _takes_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def response_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed next-token loss over the response tokens, and their count; both (rows,).

    ``batch`` is a left-padded batch of :func:`collate_instructions` (labels (rows, T)). Logits are
    computed only from the position before the earliest answer token on (where the model supports
    ``logits_to_keep``, as LLaMA, Qwen and Mistral do), which gives the same loss as full logits.
    """
    labels = batch["labels"]
    inputs: dict[str, torch.Tensor | int] = {k: v for k, v in batch.items() if k != "labels"}
    scored = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    if scored.numel() and _takes_logits_to_keep(model):
        inputs["logits_to_keep"] = labels.shape[1] - int(scored[0]) + 1
    logits = model(**inputs).logits  # (rows, K, vocab), K <= T
    return token_losses(logits, labels[:, labels.shape[1] - logits.shape[1] :])


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed next-token cross-entropy and counted tokens.

    Args:
        logits: (rows, T, vocab) model outputs.
        labels: (rows, T) token labels, IGNORE_INDEX where not scored.
    Returns:
        ((rows,) summed loss, (rows,) number of scored tokens); position t predicts label t + 1.
    """
    shifted = labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), shifted, ignore_index=IGNORE_INDEX, reduction="none"
    )  # (rows, T - 1)
    return losses.sum(dim=1), (shifted != IGNORE_INDEX).sum(dim=1)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    settings: GenerationSettings,
    device: torch.device,
) -> list[str]:
    """Answers to ``prompts`` (token ids), generated in one left-padded batch, decoded and stripped.

    Left padding keeps every prompt's last token at the end, where generation continues; the attention
    mask hides the padding, so each answer equals the one generated for its prompt alone.
    """
    if not prompts:
        return []
    model.eval()
    input_ids = pad_rows(prompts, tokenizer.pad_token_id, left=True).to(device)
    mask = pad_rows([[1] * len(p) for p in prompts], 0, left=True).to(device)
    options: dict[str, bool | int | float | None] = {"do_sample": settings.do_sample, "num_beams": settings.num_beams}
    if settings.do_sample:
        options.update(temperature=settings.temperature, top_p=settings.top_p)
    else:  # greedy / beam: the checkpoint's sampling defaults would only trigger warnings
        options.update(temperature=None, top_p=None, top_k=None)
    # generate comes from transformers' GenerationMixin, which torch's Module does not declare.
    out = model.generate(  # type: ignore[operator]
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=settings.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        **options,
    )
    new = out[:, input_ids.shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]


def evaluate_generation(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: Sequence[EncodedInstructions],
    settings: GenerationSettings,
    batch_size: int,
    device: torch.device,
    *,
    before_batch: Callable[[np.ndarray], None] | None = None,
) -> list[dict[str, float]]:
    """ROUGE-1, ROUGE-L, exact match and teacher-forced response loss of each of ``data``'s sets.

    Several sets are scored together for clients trained side by side in adapter slots: each step
    takes ``batch_size`` examples of every set, set after set (all sets have the same size then).
    ``before_batch(indices)`` runs before each step (e.g. to set per-instance expert weights).
    """
    from fedtreelora.train.rouge import rouge_scores

    k, n = len(data), len(data[0])
    model.eval()
    predictions: list[list[str]] = [[] for _ in range(k)]
    loss_sum, tokens = np.zeros(k), np.zeros(k)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        if before_batch is not None:
            before_batch(idx)
        batch = collate_instructions(tokenizer, [(d, idx) for d in data])
        batch = {key: v.to(device) for key, v in batch.items()}
        with torch.no_grad():
            summed, counted = response_losses(model, batch)
        loss_sum += summed.view(k, -1).sum(dim=1).cpu().numpy()
        tokens += counted.view(k, -1).sum(dim=1).cpu().numpy()
        answers = generate(model, tokenizer, [d.prompt_ids[i] for d in data for i in idx], settings, device)
        for j in range(k):
            predictions[j].extend(answers[j * len(idx) : (j + 1) * len(idx)])
    results = []
    for j in range(k):
        scores = rouge_scores(predictions[j], data[j].references)
        loss = float(loss_sum[j] / tokens[j]) if tokens[j] else float("nan")
        results.append({**scores, "eval_loss": loss})
    return results


def iterate_prompts(
    tokenizer: PreTrainedTokenizerBase, data: EncodedInstructions, batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches of the prompts alone (input_ids, attention_mask), in order; e.g. to embed
    instances."""
    for start in range(0, len(data), batch_size):
        rows = data.prompt_ids[start : start + batch_size]
        yield {
            "input_ids": pad_rows(rows, tokenizer.pad_token_id, left=False),
            "attention_mask": pad_rows([[1] * len(r) for r in rows], 0, left=False),
        }
