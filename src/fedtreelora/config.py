"""The experiment configuration: one typed, versionable tree, loaded from YAML and ``--set`` overrides."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator
from pydantic_core import ErrorDetails

from fedtreelora.data.instructions import BUILTIN_INSTRUCTION_SOURCES
from fedtreelora.errors import ConfigError
from fedtreelora.strategies.options import StrategyOptions
from fedtreelora.strategies.registry import METHODS  # torch-free: method names and options classes only

CLASSIFIER_TARGETS = ["query", "value"]
"""LoRA targets when ``model.target_modules`` is not set and the task is classification (BERT names)."""
CAUSAL_TARGETS = ["q_proj", "v_proj"]
"""LoRA targets when ``model.target_modules`` is not set and the task is generation (LLaMA/Qwen/Mistral names)."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ModelConfig(Section):
    name: str = "minilm"
    """Backbone: ``minilm`` (installed all-MiniLM-L6-v2), ``smollm2`` (installed SmolLM2-135M-Instruct, a causal
    LM for generation), a hub id (e.g. ``roberta-large``, ``meta-llama/Llama-2-7b-hf``) or a local path."""
    num_layers: int | None = Field(default=None, ge=1)
    """Keep only the first n transformer layers (fast tests); None keeps all."""
    target_modules: list[str] = Field(default_factory=lambda: list(CLASSIFIER_TARGETS))
    """Linear modules that get LoRA, matched by name suffix as in PEFT. Unset: ``query``/``value`` for
    classification, ``q_proj``/``v_proj`` for generation (LLaMA, Qwen, Mistral, SmolLM2 names)."""
    rank: int = Field(default=8, ge=1)
    """LoRA rank r."""
    alpha: float = Field(default=16.0, gt=0)
    """LoRA alpha; the update is scaled by alpha / rank."""
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""
    head: Literal["frozen", "local"] = "frozen"
    """Classification head: a shared random initialisation kept frozen (the paper), or trained and kept by each client."""
    max_length: int = Field(default=64, ge=8)
    """Tokens per example after truncation (generation: prompt plus answer; the prompt keeps its last
    ``max_length - generation.max_new_tokens`` tokens)."""
    quantization: Literal["none", "8bit", "4bit"] = "none"
    """Load a causal LM's weights in 8 or 4 bits through bitsandbytes (CUDA only, ``pip install bitsandbytes``),
    as the paper's 8-bit LLaMA-2-7B; ``none`` keeps float32 weights."""


GROUP_NAME_PART = re.compile(r"[A-Za-z0-9_.-]+")
"""One ``/``-separated part of a group name: letters, digits, ``_``, ``.`` and ``-``."""


def _label_names_as_text(value: Any) -> Any:
    """YAML reads ``0: 1`` as integers; label names are strings (integer labels are named ``"0"``...)."""
    if not isinstance(value, dict):
        return value
    return {
        (str(k) if isinstance(k, int) else k): (str(v) if isinstance(v, int) and not isinstance(v, bool) else v)
        for k, v in value.items()
    }


class DriftConfig(Section):
    """A change of a group's labels at a known round (``data.groups[i].drift``): from that round on its
    clients train and are scored on the same examples under new label names."""

    round: int
    """The first round (1-based, as the round table counts; 2..``federation.rounds``) in which the group's
    clients train and are validated on the new labels; the rounds before use ``label_map``."""
    label_map: dict[str, str | None]
    """Source label name -> the name the group uses from ``round`` on (e.g. swap two names); labels not
    listed keep the name the group's ``label_map`` gives them. The examples stay the same, so a label the
    group keeps cannot be mapped to null, a label it drops cannot be brought back, and every name must
    be one of the federation's labels (the classification head is built at the start)."""
    name: str | None = None
    """The group's name from ``round`` on, as the planted groups record it (what the sharing partition's
    ARI is scored against at the end of the run): name another group to say its clients now have that
    group's task (a swap onto its labels), or a new name for a task of their own; None: the name stays."""

    @field_validator("label_map", mode="before")
    @classmethod
    def _label_names_as_text(cls, value: Any) -> Any:
        return _label_names_as_text(value)


class GroupConfig(Section):
    """One group of clients of a structured federation (an entry of ``data.groups``).

    Every option left unset (None) takes the value of the data section's option of the same name.
    """

    name: str
    """Group name; ``/`` nests groups (``news/plain``, ``news/flipped``, ``tweets/plain``) and the planted
    hierarchy is the tree of name prefixes. Each part holds letters, digits, ``_``, ``.`` or ``-``."""
    clients: int = Field(ge=1)
    """Clients in this group."""
    dataset: str | None = None
    """Source of the group's examples (as ``data.dataset``); None: ``data.dataset``."""
    hub_config: str | None = None
    """Hub configuration of the group's source; None: ``data.hub_config``."""
    text_column: str | None = None
    """Text column of the group's source; None: ``data.text_column``."""
    text_pair_column: str | None = None
    """Second-sentence column of the group's source; None: ``data.text_pair_column``."""
    label_column: str | None = None
    """Label column of the group's source; None: ``data.label_column``."""
    label_map: dict[str, str | None] | None = None
    """Source label name -> the name this group uses (rename, or permute for concept shift); a name
    mapped to null drops that class's examples from the group; unmapped names stay as they are."""
    dirichlet_alpha: float | None = Field(default=None, gt=0)
    """Label skew of the group's clients; None: ``data.dirichlet_alpha``."""
    n_train: int | None = Field(default=None, ge=1)
    """Training examples per client of the group; None: ``data.n_train``."""
    n_val: int | None = Field(default=None, ge=1)
    """Validation examples per client of the group; None: ``data.n_val``."""
    drift: DriftConfig | None = None
    """The group's labels change at a known round (``{round, label_map, name}``): from then on its
    clients train and are scored on their examples relabelled (a concept drift); None: they never change.
    In-process engine and Flower simulation only (a deployed site holds its own data)."""

    @field_validator("label_map", mode="before")
    @classmethod
    def _label_names_as_text(cls, value: Any) -> Any:
        return _label_names_as_text(value)


def _check_name_parts(name: str, field: str) -> None:
    """Raise ValueError naming ``field`` when a ``/``-separated part of ``name`` is empty or malformed."""
    bad = [p for p in name.split("/") if not GROUP_NAME_PART.fullmatch(p)]
    if bad:
        raise ValueError(
            f"{field}={name!r} has an empty or invalid part {bad[0]!r}; parts are separated "
            "by '/' and hold letters, digits, '_', '.' or '-'"
        )


def _check_leaves(named: dict[str, str]) -> None:
    """Raise ValueError when one group name (a key of ``named``: name -> the field that gives it) is a
    prefix of another: a group's clients must sit at a leaf of the hierarchy."""
    for name, field in named.items():
        for other, other_field in named.items():
            if other.startswith(name + "/"):
                raise ValueError(
                    f"{field}={name!r} is a group and also a prefix of {other_field}={other!r}; a group's "
                    f"clients must sit at a leaf of the hierarchy: rename it (e.g. {name + '/plain'!r})"
                )


def _check_group_names(names: list[str]) -> None:
    """Raise ValueError naming ``data.groups[i].name`` for an empty or malformed part, a repeated name,
    or a name that is both a group and a prefix of another group."""
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        _check_name_parts(name, f"data.groups[{i}].name")
        if name in seen:
            raise ValueError(
                f"data.groups[{i}].name={name!r} repeats data.groups[{seen[name]}].name; names must be unique"
            )
        seen[name] = i
    _check_leaves({name: f"data.groups[{i}].name" for name, i in seen.items()})


def _check_drift_names(groups: list[GroupConfig]) -> None:
    """Raise ValueError naming ``data.groups[i].drift.name`` for a malformed name, or one that breaks
    the hierarchy the groups form from some drift's round on (a name that is a prefix of another
    group's name in the same round)."""
    for i, group in enumerate(groups):
        if group.drift is not None and group.drift.name is not None:
            _check_name_parts(group.drift.name, f"data.groups[{i}].drift.name")
    for rnd in sorted({g.drift.round for g in groups if g.drift is not None}):
        named: dict[str, str] = {}
        for i, group in enumerate(groups):
            if group.drift is not None and group.drift.name is not None and group.drift.round <= rnd:
                named.setdefault(group.drift.name, f"data.groups[{i}].drift.name")
            else:
                named.setdefault(group.name, f"data.groups[{i}].name")
        _check_leaves(named)


class DataConfig(Section):
    dataset: str = "sarcasm"
    """Built-in short name (classification: sarcasm, corr2cause, tweets, bbc; generation: evals-nlg), a
    CSV/TSV/JSONL/JSON/parquet file, a local dataset folder or a hub id."""
    task: Literal["auto", "classification", "generation"] = "auto"
    """``classification`` (a label per example, accuracy) or ``generation`` (instruction tuning of a causal
    LM, ROUGE); ``auto``: generation for the builtin instruction sources (evals-nlg), else classification."""
    text_column: str = "text"
    """Column with the text (files and hub data)."""
    text_pair_column: str | None = None
    """Column with the second sentence of a pair task, if any."""
    label_column: str = "label"
    """Column with the label (classification)."""
    instruction_column: str = "instruction"
    """Column with the instruction (generation, files and hub data)."""
    input_column: str = "input"
    """Column with the optional input of an instruction (generation; absent: no inputs)."""
    output_column: str = "output"
    """Column with the reference answer (generation)."""
    category_column: str = "category"
    """Column with the category reported in the per-category table (generation; absent: the task)."""
    task_column: str | None = None
    """Column naming each example's task; one task per client (generation; None or absent: the category)."""
    tasks: list[str] | None = None
    """Generation: keep only these tasks, in this order (client k holds task k mod len(tasks)); for evals-nlg
    any of its task names; None: all tasks (evals-nlg: its eight)."""
    hub_config: str | None = None
    """Configuration name of a hub dataset (e.g. ``sst2`` for ``glue``)."""
    train_split: str = "train"
    """Split the client training sets are drawn from."""
    validation_split: str | None = None
    """Split the client validation sets are drawn from; None uses the source's validation split or holds out 20%."""
    num_clients: int = Field(default=10, ge=1)
    """Number of clients N."""
    n_train: int = Field(default=128, ge=1)
    """Training examples per client."""
    n_val: int = Field(default=64, ge=1)
    """Validation examples per client, drawn with the client's own label proportions (generation: its
    test split, from its own task)."""
    dirichlet_alpha: float = Field(default=0.5, gt=0)
    """Concentration of the Dirichlet label skew; smaller is more skewed (classification only)."""
    groups: list[GroupConfig] | None = None
    """A federation with planted structure (classification only): groups of clients, each with its own
    source, label map, skew and sizes; ``num_clients`` becomes the sum of their clients. Names nest
    with ``/`` (``sarcasm/plain``, ``sarcasm/flipped``); see docs/data-and-models.md. None: one source,
    ``num_clients`` clients."""

    @model_validator(mode="after")
    def _resolve_groups(self) -> DataConfig:
        if self.groups is None:
            return self
        if not self.groups:
            raise ValueError("data.groups is empty; list at least one group or leave data.groups unset")
        _check_group_names([g.name for g in self.groups])
        _check_drift_names(self.groups)
        for i, group in enumerate(self.groups):
            source = group.dataset or self.dataset
            if self.task == "generation" or (self.task == "auto" and source in BUILTIN_INSTRUCTION_SOURCES):
                raise ValueError(
                    f"data.groups[{i}] ({group.name}) draws generation data ({source!r}); data.groups applies to "
                    "classification only: use classification sources or leave data.groups unset"
                )
        total = sum(g.clients for g in self.groups)
        if "num_clients" in self.model_fields_set and self.num_clients != total:
            counts = " + ".join(str(g.clients) for g in self.groups)
            raise ValueError(
                f"data.num_clients={self.num_clients} but data.groups hold {counts} = {total} clients; leave "
                "data.num_clients unset (it becomes the groups' sum) or make the two agree"
            )
        if self.num_clients != total:
            self.num_clients = total
        return self

    def resolved_task(self) -> str:
        """``classification`` or ``generation`` (``auto`` resolved from the dataset)."""
        if self.task != "auto":
            return self.task
        return "generation" if self.dataset in BUILTIN_INSTRUCTION_SOURCES else "classification"


class TrainConfig(Section):
    batch_size: int = Field(default=16, ge=1)
    """Examples per local step."""
    eval_batch_size: int = Field(default=64, ge=1)
    """Examples per evaluation forward pass."""
    local_epochs: int = Field(default=2, ge=1)
    """Passes over the client's training set per round (ignored when local_steps is set)."""
    local_steps: int | None = Field(default=None, ge=1)
    """Fixed number of local steps per round instead of epochs."""
    lr: float = Field(default=5e-3, gt=0)
    """AdamW learning rate of the LoRA factors (and a local head)."""
    mixer_lr: float = Field(default=5e-2, gt=0)
    """AdamW learning rate of the mixer (lambda logits, routers): one scalar per module moves slowly at the LoRA rate."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay."""
    clients_per_pass: int | Literal["auto"] = "auto"
    """Clients trained together in one forward/backward, each in its own adapter slot; 1 trains them one at a
    time. ``auto``: 1 on CPU (no measured gain there), every client (at most 32) on a GPU."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``bf16`` autocasts matmuls to bfloat16 (adapters and optimizer stay float32); ``auto``: bf16 on a GPU, fp32 on CPU."""
    device: str = "auto"
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda``, ``cuda:1`` ..."""
    compile: bool = False
    """Compile the model's forward with ``torch.compile`` (inductor). The first steps of each new shape
    pay the compile (tens of seconds); it pays off on a GPU over long runs. Needs a C++ compiler on CPU."""


class GenerationConfig(Section):
    max_new_tokens: int = Field(default=32, ge=1)
    """Longest generated answer in tokens (training answers are cut to this length too)."""
    num_beams: int = Field(default=1, ge=1)
    """Beam search width; 1 is greedy (the default) or sampling."""
    do_sample: bool = False
    """Sample answers instead of greedy/beam decoding (seeded by the client's round seed)."""
    temperature: float = Field(default=1.0, gt=0)
    """Sampling temperature (with do_sample)."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling mass (with do_sample)."""


class FederationConfig(Section):
    rounds: int = Field(default=12, ge=1)
    """Communication rounds, warm-up included."""
    fraction_train: float = Field(default=1.0, gt=0.0, le=1.0)
    """Share of clients sampled to train each round (from the seed); the others keep their state. Every
    client, sampled or not, is still scored each round on the model it would receive (``evaluate``)."""
    max_update_norm: float | None = Field(default=None, gt=0)
    """Reject an uploaded tensor whose Frobenius norm exceeds this; None: no bound."""
    checkpoint_every: int = Field(default=1, ge=0)
    """Write a checkpoint every n rounds (0: never); `fedtreelora run --resume DIR` continues from it."""
    server_device: str | None = None
    """Where the server aggregates and plans: None (default) numpy float64 on the CPU; a torch device
    (``cpu``, ``cuda``, ``cuda:1``) or ``auto`` (CUDA when available) for torch float64 there, which
    pays off with hundreds of clients or LLaMA-sized adapters on a server with a GPU."""
    join: dict[int, int] = Field(default_factory=dict)
    """Clients that arrive late: client id -> the round (1-based, as the round table counts) it first
    takes part in; clients not listed are there from round 1. Before that round a client neither
    trains, nor counts in any average, nor is scored. A FedTreeLoRA client that arrives after the tree
    is built trains its own warm-up first and is then placed in the tree (``fedtreelora.join_*``)."""
    leave: dict[int, int] = Field(default_factory=dict)
    """Clients that go: client id -> the round (1-based) from which it no longer takes part (it takes
    part up to the round before). From then on it neither trains, nor counts in any average (its
    cluster's and the external experts' included), nor is scored."""
    evaluate: Literal["received", "trained"] = "received"
    """Which score a round reports (both are recorded in the run's per-client metrics every round): ``received``
    (the methods' papers' convention): after the server's step, each client's kept state plus what
    the server sends it, in the next round's phase, and after the last round the final aggregation;
    every client is scored, sampled that round or not, so a round's mean is over the whole federation.
    ``trained``: each client right after its local training, before the server aggregates; only the
    clients that trained that round can be scored (under ``fraction_train`` < 1 a different subset
    each round)."""


class PrivacyConfig(Section):
    """Client-level differential privacy of the uploads (docs/privacy.md). Off while ``clip_norm`` is unset."""

    clip_norm: float | None = Field(default=None, gt=0)
    """S: each client's update (its upload minus what the server already knows of it, every uploaded tensor
    together) is clipped to this L2 norm before noise is added; None: no clipping, no noise (privacy off)."""
    noise_multiplier: float | None = Field(default=None, ge=0)
    """z: Gaussian noise of std z * S is added to every coordinate of the clipped update (0: clipping alone,
    no guarantee). Set this or ``target_epsilon``, not both."""
    target_epsilon: float | None = Field(default=None, gt=0)
    """Derive z instead: the smallest noise multiplier whose epsilon after ``federation.rounds`` rounds at the
    sampling rate of ``federation.fraction_train`` stays at most this, at ``delta``."""
    delta: float = Field(default=1e-5, gt=0, lt=1)
    """The delta of the (epsilon, delta) guarantee; must be below 1 / data.num_clients (a delta as large
    as one client's share lets a mechanism publish one client's whole update)."""
    accountant: Literal["rdp", "prv"] = "rdp"
    """Opacus's accountant: ``rdp`` (Renyi DP, an upper bound) or ``prv`` (privacy random variables, tighter)."""
    adjacency: Literal["add_remove", "replace"] = "add_remove"
    """Neighbouring federations differ by one client's whole data: ``add_remove`` (present or absent; the
    sensitivity is S) or ``replace`` (swapped for any other data; the sensitivity is 2S, so the accountant
    sees z / 2)."""
    secure_aggregation: bool = False
    """Flower engine only: the server learns only sums. Each node hides its upload in a vector with one slot
    per cluster of each layer (its own cluster's slot holds its factors, the others zeros) and Flower's
    SecAgg+ sums those vectors over the round's nodes, so the server sees each cluster's sum and the counts,
    never one client's upload. Methods: ``fedit`` and ``fedtreelora`` (whose warm-up uploads stay in the
    clear: the tree is built from them); see docs/privacy.md."""
    secure_clipping_range: float | None = Field(default=None, gt=0)
    """With ``secure_aggregation``: SecAgg+ clips every uploaded value to [-range, range] before it quantises
    it. None (default): chosen each round from the factors' scale, 2 * (m + lr * steps): m the largest
    magnitude of the factors the server sent this round (at least the initial A's bound 1 / sqrt(d_in)),
    lr * steps what AdamW can move a value in the round's local steps (plus 6 noise stds under DP)."""
    secure_quantization_range: int = Field(default=2**22, ge=2)
    """With ``secure_aggregation``: the levels each value in [-range, range] is quantised to (SecAgg+'s
    ``quantization_range``); the quantisation step is 2 * clipping range / this. Even, and times
    ``data.num_clients`` below 2**32 (the sums are taken modulo 2**32)."""
    secure_reconstruction_threshold: float = Field(default=0.5, gt=0, le=1)
    """With ``secure_aggregation``: the share of a round's nodes whose key shares rebuild the masks of a node
    that drops out (SecAgg+'s ``reconstruction_threshold``, at least 2 nodes): higher protects better
    against colluding nodes, lower survives more dropouts."""

    @property
    def enabled(self) -> bool:
        """Uploads are clipped (and noised): ``clip_norm`` is set."""
        return self.clip_norm is not None

    @model_validator(mode="after")
    def _one_noise_setting(self) -> PrivacyConfig:
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ValueError(
                f"privacy.noise_multiplier={self.noise_multiplier} and privacy.target_epsilon={self.target_epsilon} "
                "are both set; set one: the noise multiplier, or the target epsilon it is derived from"
            )
        noise = "privacy.noise_multiplier" if self.noise_multiplier is not None else "privacy.target_epsilon"
        if self.clip_norm is None and (self.noise_multiplier is not None or self.target_epsilon is not None):
            raise ValueError(
                f"{noise} is set but privacy.clip_norm is not; the noise is scaled to the clipping bound: set "
                "privacy.clip_norm (e.g. 1.0) too"
            )
        if self.clip_norm is not None and self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError(
                f"privacy.clip_norm={self.clip_norm} is set but neither privacy.noise_multiplier nor "
                "privacy.target_epsilon; set one (privacy.noise_multiplier=0 clips without noise)"
            )
        return self


def _check_schedule(federation: FederationConfig, num_clients: int) -> None:
    """Raise ValueError naming ``federation.join`` / ``federation.leave`` for a client id outside the
    federation, a round outside the run, a client that leaves before it joins, or a round nobody takes
    part in."""
    rounds = federation.rounds
    for name, schedule, first in (("join", federation.join, 1), ("leave", federation.leave, 2)):
        for client, rnd in schedule.items():
            if not 0 <= client < num_clients:
                raise ValueError(
                    f"federation.{name} names client {client}, but the clients are 0..{num_clients - 1} "
                    "(data.num_clients); remove it or use an id in that range"
                )
            if not first <= rnd <= rounds:
                raise ValueError(
                    f"federation.{name}[{client}]={rnd} is outside rounds {first}..{rounds} (federation.rounds="
                    f"{rounds}; rounds count from 1{', and a client must take part at least once' if name == 'leave' else ''})"
                    f"; pick a round in that range or remove the entry"
                )
    for client, leaves in federation.leave.items():
        joins = federation.join.get(client, 1)
        if leaves <= joins:
            raise ValueError(
                f"federation.leave[{client}]={leaves} is not after federation.join[{client}]={joins}; "
                "a client leaves at a round later than the one it joins at"
            )
    for rnd in range(1, rounds + 1):
        present = [
            k
            for k in range(num_clients)
            if federation.join.get(k, 1) <= rnd and (k not in federation.leave or rnd < federation.leave[k])
        ]
        if not present:
            raise ValueError(
                f"no client takes part in round {rnd} under federation.join and federation.leave; "
                "keep at least one client in every round (or lower federation.rounds)"
            )


def _check_drift_rounds(data: DataConfig, rounds: int) -> None:
    """Raise ValueError naming ``data.groups[i].drift.round`` for a round outside 2..``rounds``."""
    for i, group in enumerate(data.groups or ()):
        if group.drift is not None and not 2 <= group.drift.round <= rounds:
            raise ValueError(
                f"data.groups[{i}].drift.round={group.drift.round} is outside rounds 2..{rounds} (federation.rounds="
                f"{rounds}; rounds count from 1, and labels that hold from round 1 belong in data.groups[{i}]."
                "label_map); pick a round in that range or remove the drift"
            )


SECURE_AGGREGATION_METHODS = ("fedit", "fedtreelora")
"""Methods whose server needs only sums per cluster (``privacy.secure_aggregation``)."""


def _check_secure_aggregation(config: ExperimentBase) -> None:
    """Raise ValueError naming the setting that needs individual uploads under ``privacy.secure_aggregation``."""
    fix = "; set privacy.secure_aggregation=false or "
    if config.method not in SECURE_AGGREGATION_METHODS:
        why = {
            "local": "it uploads nothing",
            "fedalt": "its server builds each client's rest-of-world LoRA from the others' individual uploads",
            "fedlease": "its server clusters and routes from individual uploads after warm-up",
        }.get(config.method, "not implemented for it")
        raise ValueError(
            f"privacy.secure_aggregation does not support method {config.method!r} ({why}){fix}"
            f"use one of {list(SECURE_AGGREGATION_METHODS)}"
        )
    federation = config.federation
    if federation.max_update_norm is not None:
        raise ValueError(
            f"federation.max_update_norm={federation.max_update_norm:g} checks each client's upload, which the "
            f"server never sees under privacy.secure_aggregation{fix}unset federation.max_update_norm"
        )
    if federation.join:
        raise ValueError(
            "federation.join places late clients in the tree by their individual warm-up uploads, which the server "
            f"never sees under privacy.secure_aggregation{fix}remove federation.join"
        )
    options = config.method_options()
    if getattr(options, "replan_every", None):
        raise ValueError(
            f"{config.method}.replan_every rebuilds the tree from every client's individual B (or B update), which the server "
            f"never sees under privacy.secure_aggregation{fix}unset {config.method}.replan_every"
        )
    n = config.data.num_clients
    sampled = n if federation.fraction_train >= 1 else max(1, round(federation.fraction_train * n))
    if sampled < 2:
        raise ValueError(
            f"privacy.secure_aggregation sums the uploads of a round's clients, but only {sampled} of "
            f"data.num_clients={n} is sampled per round (federation.fraction_train={federation.fraction_train:g}); "
            "raise federation.fraction_train or data.num_clients so that at least 2 clients take part"
        )
    levels = config.privacy.secure_quantization_range
    if levels % 2 or levels * n >= 2**32:
        raise ValueError(
            f"privacy.secure_quantization_range={levels} must be even and, times data.num_clients={n}, below 2**32 "
            f"(zero must quantise exactly, and the sum of {n} values must not wrap modulo 2**32); "
            f"use an even value below {2**32 // n} (e.g. {2 ** min(22, (2**32 // n).bit_length() - 1)})"
        )


class LoggingConfig(Section):
    tensorboard: bool = True
    """Write per-round scalars (mean and per-client accuracy, loss, communication) to ``OUT/tensorboard``."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the ``wandb`` package and a login)."""


class ExperimentBase(Section):
    """Everything a run needs. Unknown keys are errors.

    Besides the sections below, every registered method has a section of its own options, named
    after the method (``fedtreelora:``, ``fedit:`` ...); see :func:`experiment_config_model`.
    """

    method: str = "fedtreelora"
    """Federated method; see ``fedtreelora methods``."""
    seed: int = 0
    """Seed of the partition, initialisation, batching and dropout."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    """How answers are generated when evaluating a causal LM (data.task generation)."""
    federation: FederationConfig = Field(default_factory=FederationConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    """Client-level differential privacy of the uploads: clipping, Gaussian noise, the accountant (docs/privacy.md)."""
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}; choose one of {sorted(METHODS)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentBase:
        if isinstance(self.train.clients_per_pass, int) and self.train.clients_per_pass < 1:
            raise ValueError("train.clients_per_pass must be >= 1 or 'auto'")
        if self.model.head == "local" and self.train.clients_per_pass not in (1, "auto"):
            raise ValueError("model.head=local trains whole head modules per client and needs train.clients_per_pass=1")
        if self.data.resolved_task() == "generation":
            if "target_modules" not in self.model.model_fields_set:
                self.model.target_modules = list(CAUSAL_TARGETS)
            if self.model.head != "frozen":
                raise ValueError("model.head applies to classification heads; a causal LM has none (leave it 'frozen')")
            if self.model.max_length <= self.generation.max_new_tokens:
                raise ValueError(
                    f"model.max_length ({self.model.max_length}) must exceed generation.max_new_tokens "
                    f"({self.generation.max_new_tokens}) to leave room for the prompt"
                )
        elif self.model.quantization != "none":
            raise ValueError("model.quantization applies to causal LMs (data.task generation); set it to 'none'")
        privacy = self.privacy
        if privacy.enabled and privacy.delta >= 1 / self.data.num_clients:
            raise ValueError(
                f"privacy.delta={privacy.delta:g} is not below 1 / data.num_clients = 1/{self.data.num_clients}; "
                "a delta that large allows publishing one client's update outright: lower privacy.delta "
                f"(e.g. {min(1e-5, 0.1 / self.data.num_clients):g})"
            )

        if privacy.secure_aggregation:
            _check_secure_aggregation(self)
        _check_schedule(self.federation, self.data.num_clients)
        _check_drift_rounds(self.data, self.federation.rounds)
        warmup = getattr(self.method_options(), "warmup_rounds", 0)
        if warmup >= self.federation.rounds:
            raise ValueError(
                f"{self.method}.warmup_rounds ({warmup}) must be smaller than federation.rounds "
                f"({self.federation.rounds}) so that some rounds share; raise rounds or lower warmup_rounds"
            )
        return self

    def method_options(self) -> StrategyOptions:
        """The options section of the chosen method (an instance of its registered options class)."""
        options = getattr(self, self.method, None)
        return options if isinstance(options, StrategyOptions) else METHODS[self.method].options()


_MODEL_CACHE: dict[tuple[tuple[str, type], ...], type[ExperimentBase]] = {}


def experiment_config_model() -> type[ExperimentBase]:
    """The config class for the methods known now: :class:`ExperimentBase` plus one options section per
    method. Rebuilt when a new method registers, so third-party methods get a section too."""
    key = tuple(sorted((name, info.options) for name, info in METHODS.items()))
    if key not in _MODEL_CACHE:
        fields: dict[str, Any] = {name: (options, Field(default_factory=options)) for name, options in key}
        _MODEL_CACHE[key] = create_model(
            "ExperimentConfig", __base__=ExperimentBase, __doc__=ExperimentBase.__doc__, **fields
        )
    return _MODEL_CACHE[key]


ExperimentConfig = ExperimentBase  # type of a validated config (its class is experiment_config_model())


def _describe(error: ErrorDetails, model: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        section: Any = model
        for part in error["loc"][:-1]:
            field = section.model_fields.get(str(part)) if hasattr(section, "model_fields") else None
            section = field.annotation if field is not None else None
        valid = sorted(section.model_fields) if isinstance(section, type) and issubclass(section, BaseModel) else []
        return f"{loc}: unknown key; valid keys here are {valid}"
    return f"{loc or 'config'}: {error['msg']} (got {error.get('input')!r})"


def validate_config(data: dict[str, Any]) -> ExperimentConfig:
    """Validate a nested dict into an :class:`ExperimentConfig`, or raise :class:`ConfigError`."""
    model = experiment_config_model()
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(e, model) for e in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``key.path=value`` override in place; the value is parsed as YAML (``3``, ``0.1``, ``[a, b]``)."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value (e.g. fedtreelora.tau=0.2), got {assignment!r}")
    path, raw = assignment.split("=", 1)
    keys = [k for k in path.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"--set has an empty key in {assignment!r}")
    set_path(data, keys, yaml.safe_load(raw), where=f"--set {path}")


def set_path(data: dict[str, Any], keys: list[str], value: Any, *, where: str) -> None:
    """Set ``data[k0][k1]...[kn] = value`` in place, creating missing sections; ``where`` names the
    setting in the error raised when a key on the way holds a value instead of a section."""
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {key!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


QUICKSTART = Path(__file__).resolve().parent / "configs" / "quickstart.yaml"
"""The default experiment: what ``fedtreelora run`` (and ``fedtreelora config``) use when no ``--config``
is given. A planted federation on which the tree has groups to find; the built-in defaults of every key
(``configs/default.yaml``) stay what a ``--config`` file starts from."""

_SHADOWED_BY_GROUPS = (
    "data.dataset",
    "data.num_clients",
    "data.hub_config",
    "data.text_column",
    "data.text_pair_column",
    "data.label_column",
)
"""Keys that each entry of ``data.groups`` sets for itself, so an override of them would do nothing."""


def load_run_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), **top: Any
) -> ExperimentConfig:
    """The configuration of ``fedtreelora run``: :func:`load_config` of ``path``, or of the quickstart
    experiment (:data:`QUICKSTART`) when no path is given.

    The quickstart's clients come from ``data.groups``, which name their own dataset; an override of a key
    the groups shadow (``data.dataset`` ...) would be silently ignored, so it is an error that says how to
    leave the groups (``--set data.groups=null``) or start from the built-in defaults (``--config``)."""
    if path is not None:
        return load_config(path, overrides, **top)
    keys = [assignment.split("=", 1)[0].strip() for assignment in overrides]
    if "data.groups" not in keys and "data" not in keys:
        shadowed = [k for k in keys if k in _SHADOWED_BY_GROUPS]
        if shadowed:
            raise ConfigError(
                f"--set {shadowed[0]} has no effect on the default experiment, whose clients come from "
                "data.groups (each group names its own dataset); add --set data.groups=null to run one "
                "dataset, or pass --config FILE to start from the built-in defaults"
            )
    return load_config(QUICKSTART, overrides, **top)


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), **top: Any
) -> ExperimentConfig:
    """Defaults, then a YAML file, then ``--set`` overrides, then keyword values (``method=``, ``seed=``)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
        data = loaded or {}
    for assignment in overrides:
        apply_override(data, assignment)
    data.update({k: v for k, v in top.items() if v is not None})
    return validate_config(data)


def dump_config(config: ExperimentConfig) -> str:
    """The resolved configuration as YAML (every key, defaults included)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def _type_name(annotation: Any) -> str:
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    return text.replace("typing.", "").replace("NoneType", "None").replace(f"{__name__}.", "")


def _list_entry_model(annotation: Any) -> type[BaseModel] | None:
    """The section type X of a ``list[X]`` or ``list[X] | None`` option, else None."""
    for arg in (annotation, *get_args(annotation)):
        if get_origin(arg) is list:
            (item,) = get_args(arg)
            if isinstance(item, type) and issubclass(item, BaseModel):
                return item
    return None


def _optional_section(annotation: Any) -> type[BaseModel] | None:
    """The section type X of an ``X | None`` option, else None."""
    for arg in get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _entry_rows(prefix: str, entry: type[BaseModel]) -> list[str]:
    """Reference rows of the keys of one list entry (``data.groups[].name`` ...), and of the keys of a
    section inside it (``data.groups[].drift.round`` ...)."""
    rows = []
    for key, sub in entry.model_fields.items():
        default = "required" if sub.is_required() else f"`{sub.get_default(call_default_factory=True)!r}`"
        doc = (sub.description or "").replace("\n", " ").replace("|", "\\|")
        kind = _type_name(sub.annotation).replace("|", "\\|")
        rows.append(f"| `{prefix}.{key}` | {kind} | {default} | {doc} |")
        inner = _optional_section(sub.annotation)
        if inner is not None:
            rows += _entry_rows(f"{prefix}.{key}", inner)
    return rows


def config_reference() -> str:
    """Markdown reference of every configuration key: type, default and meaning, from the schema itself."""
    model = experiment_config_model()
    lines = [
        "# Configuration reference",
        "",
        "Generated from the configuration schema (`fedtreelora config --reference`). Set keys in a YAML file",
        "(`--config FILE`) or one at a time (`--set section.key=value`).",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for key, sub in annotation.model_fields.items():
                default = sub.get_default(call_default_factory=True)
                doc = (sub.description or "").replace("\n", " ").replace("|", "\\|")
                kind = _type_name(sub.annotation).replace("|", "\\|")
                lines.append(f"| `{name}.{key}` | {kind} | `{default!r}` | {doc} |")
                entry = _list_entry_model(sub.annotation)
                if entry is not None:
                    lines += _entry_rows(f"{name}.{key}[]", entry)
        else:
            doc = (field.description or "").replace("\n", " ").replace("|", "\\|")
            lines.append(f"| `{name}` | {_type_name(annotation)} | `{field.get_default()!r}` | {doc} |")
    return "\n".join(lines) + "\n"
