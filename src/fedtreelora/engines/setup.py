"""Build a federation from a config: data, partition, backbone, adapters, strategy.

Shared by every engine, so a run sees the same clients and the same initialisation wherever it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from fedtreelora.adapters import AdapterBank
from fedtreelora.config import ExperimentConfig
from fedtreelora.core.placement import Membership
from fedtreelora.data import (
    ClassificationDataset,
    ClientData,
    InstructionColumns,
    InstructionDataset,
    InstructionSet,
    LabeledTexts,
    dirichlet_partition,
    group_specs,
    load_classification,
    load_group_sources,
    load_instructions,
    partition_groups,
    planted_groups,
    task_partition,
)
from fedtreelora.errors import ConfigError
from fedtreelora.models import Backbone, load_causal_lm, load_classifier
from fedtreelora.models.causal import is_quantized
from fedtreelora.strategies import FederationContext, Strategy, get_strategy
from fedtreelora.train import EncodedExamples, LocalTraining, encode, local_training
from fedtreelora.train.generation import EncodedInstructions, encode_instructions
from fedtreelora.train.metrics import PRIMARY_METRIC
from fedtreelora.train.upload import UploadTransform


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_server_device(name: str | None) -> str | None:
    """``federation.server_device`` as the strategies take it: None (numpy) or a torch device string.

    Raises:
        ConfigError: the name is not a torch device, or names CUDA on a machine without it.
    """
    if name is None:
        return None
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(
            f"federation.server_device={name!r} is not a torch device; use cpu, cuda, cuda:N, auto or null"
        ) from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"federation.server_device={name!r} but this machine has no CUDA device; use cpu, auto or null"
        )
    return str(device)


def membership_of(config: ExperimentConfig, num_clients: int) -> Membership:
    """Who takes part in which round, from ``federation.join`` and ``federation.leave`` (1-based
    rounds there, 0-based here)."""
    federation = config.federation
    return Membership(
        num_clients,
        join={int(k): int(r) - 1 for k, r in federation.join.items()},
        leave={int(k): int(r) - 1 for k, r in federation.leave.items()},
    )


def client_seed(seed: int, rnd: int, client: int) -> int:
    """A seed for one client's round, independent of the order clients run in."""
    return int(np.random.SeedSequence([seed, rnd, client]).generate_state(1)[0])


def clients_per_pass(config: ExperimentConfig, device: torch.device) -> int:
    """Resolve ``train.clients_per_pass``: ``auto`` is 1 on CPU and every client (at most 32) on a GPU;
    a client-local head always trains one client at a time."""
    value = config.train.clients_per_pass
    if config.model.head == "local":
        return 1
    if value == "auto":
        return 1 if device.type == "cpu" else min(config.data.num_clients, 32)
    return int(value)


class FederationView(Protocol):
    """What the server side of a run knows of its federation, wherever the clients live: the config,
    the model side (backbone, adapters, strategy), and the clients' label counts. Both
    :class:`Federation` (in process) and Flower's ``ServerFederation`` are one."""

    @property
    def config(self) -> ExperimentConfig: ...

    @property
    def classifier(self) -> Backbone:
        """The backbone: a classifier or a causal LM."""
        ...

    @property
    def bank(self) -> AdapterBank: ...

    @property
    def strategy(self) -> Strategy: ...

    @property
    def initial_state(self) -> dict[str, torch.Tensor]:
        """Every client's state before its first round."""
        ...

    @property
    def device(self) -> torch.device: ...

    @property
    def task(self) -> str:
        """``classification`` or ``generation``."""
        ...

    @property
    def metric(self) -> str:
        """The per-client metric the run records and averages: ``accuracy`` or ``rouge1``."""
        ...

    @property
    def dataset_name(self) -> str: ...

    @property
    def num_clients(self) -> int: ...

    @property
    def num_labels(self) -> int:
        """Classes (classification) or tasks (generation)."""
        ...

    @property
    def label_names(self) -> list[str]: ...

    @property
    def label_counts(self) -> list[list[int]]:
        """(clients, labels) training examples per label."""
        ...

    def client_categories(self) -> list[str] | None:
        """Each client's category (generation); None for classification."""
        ...

    def partition_record(self) -> dict[str, Any]:
        """Each client's label counts (JSON-ready), as the run folder records them."""
        ...


class RunTask:
    """A run's task and metric, read from its ``config`` (shared by every view of a federation)."""

    config: ExperimentConfig

    @property
    def task(self) -> str:
        """``classification`` or ``generation``."""
        return self.config.data.resolved_task()

    @property
    def metric(self) -> str:
        """The per-client metric the run records and averages: ``accuracy`` or ``rouge1``."""
        return PRIMARY_METRIC[self.task]


@dataclass
class Federation(RunTask):
    """Everything a run needs, built once.

    Classification: the dataset's labels are classes and clients are Dirichlet label-skewed.
    Generation (instruction tuning): the "labels" are tasks and every client holds one task.
    """

    config: ExperimentConfig
    dataset: ClassificationDataset | InstructionDataset
    clients: list[ClientData]
    classifier: Backbone
    """The backbone: a classifier or a causal LM (the field's name predates generation)."""
    bank: AdapterBank
    strategy: Strategy
    train_data: list[EncodedExamples | EncodedInstructions]
    """Each client's encoded training split (all classification or all instruction examples)."""
    val_data: list[EncodedExamples | EncodedInstructions]
    initial_state: dict[str, torch.Tensor]
    settings: LocalTraining
    device: torch.device
    upload_transforms: tuple[UploadTransform, ...] = ()
    """The run's upload chain, applied in order to every client's upload wherever it trains (one client
    per pass, several, a Flower node; :func:`fedtreelora.train.client_upload`). Empty: the upload is the
    strategy's keys of the trained state, unchanged. The ``privacy`` section puts the Gaussian mechanism
    here (:func:`upload_chain`); code that needs another link (a test) replaces this field."""
    drifted: dict[int, DriftedData] = field(default_factory=dict)
    """Row of ``train_data`` / ``val_data`` -> the same examples relabelled and the round they take
    effect (clients of a group with ``data.groups[i].drift``); read through :meth:`client_data`."""

    def client_data(
        self, rnd: int, index: int
    ) -> tuple[EncodedExamples | EncodedInstructions, EncodedExamples | EncodedInstructions]:
        """The (training, validation) examples row ``index`` trains and is scored on in round ``rnd``
        (0-based): its relabelled ones from its drift's round on, else ``train_data[index]`` and
        ``val_data[index]``. A function of the round alone, so a resumed run reads the same data."""
        drifted = self.drifted.get(index)
        if drifted is not None and rnd >= drifted.round:
            return drifted.train, drifted.val
        return self.train_data[index], self.val_data[index]

    def client_categories(self) -> list[str] | None:
        """Each client's category (generation: its task's category, e.g. ``Sentiment``); None for
        classification."""
        if not isinstance(self.dataset, InstructionDataset):
            return None
        names = self.label_names
        return [self.dataset.task_category(names[int(c.train_label_counts.argmax())]) for c in self.clients]

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    @property
    def dataset_name(self) -> str:
        return self.dataset.name

    @property
    def num_labels(self) -> int:
        """Classes (classification) or tasks (generation)."""
        return len(self.label_names)

    @property
    def label_names(self) -> list[str]:
        """Class names (classification) or task names (generation), as counted in the partition."""
        if isinstance(self.dataset, InstructionDataset):
            return self.dataset.task_names
        return list(self.dataset.train.label_names)

    @property
    def label_counts(self) -> list[list[int]]:
        """(clients, labels) training examples per label."""
        return [c.train_label_counts.tolist() for c in self.clients]

    def partition_record(self) -> dict[str, Any]:
        """Each client's label (generation: task) counts and proportions (JSON-ready)."""
        categories = self.client_categories()
        extra = {} if categories is None else {"task": "generation", "client_categories": categories}
        planted = planted_groups(self.config.data)
        return {
            "dataset": self.dataset.name,
            "label_names": self.label_names,
            **extra,
            "dirichlet_alpha": self.config.data.dirichlet_alpha,
            "seed": self.config.seed,
            **({} if planted is None else {"groups": group_records(self.config)}),
            "clients": [
                {
                    "client": c.client,
                    **({} if planted is None else {"group": planted[c.client]}),
                    "train_label_counts": c.train_label_counts.tolist(),
                    "val_label_counts": c.val_label_counts.tolist(),
                    "proportions": [round(float(p), 6) for p in c.proportions],
                }
                for c in self.clients
            ],
        }


@dataclass(frozen=True)
class DriftedData:
    """One client's examples relabelled by its group's drift (``data.groups[i].drift``)."""

    round: int
    """The first round (0-based) they are trained and scored on."""
    train: EncodedExamples
    """Its training examples (the same token ids), labels (n_train,) after the drift."""
    val: EncodedExamples
    """Its validation examples, labels (n_val,) after the drift."""


def drifted_data(
    clients: list[ClientData],
    train_data: list[EncodedExamples | EncodedInstructions],
    val_data: list[EncodedExamples | EncodedInstructions],
) -> dict[int, DriftedData]:
    """Each drifting client's encoded examples with its drift's labels (row -> data; rows as in
    ``clients``); the token ids are shared with ``train_data`` / ``val_data``, not copied."""
    out: dict[int, DriftedData] = {}
    for row, c in enumerate(clients):
        if c.drift is None:
            continue
        train, val = train_data[row], val_data[row]
        assert isinstance(train, EncodedExamples) and isinstance(val, EncodedExamples), "drift is classification"
        out[row] = DriftedData(
            c.drift.round, replace(train, labels=c.drift.train_labels), replace(val, labels=c.drift.val_labels)
        )
    return out


def group_records(config: ExperimentConfig) -> list[dict[str, Any]]:
    """Each group of ``data.groups`` with its options resolved (JSON-ready; empty without groups); a
    drifting group's ``drift`` with its round 1-based, as configured."""
    return [
        {
            "name": g.name,
            "clients": g.clients,
            "dataset": g.source.dataset,
            "label_map": None if g.label_map is None else dict(g.label_map),
            "dirichlet_alpha": g.alpha,
            "n_train": g.n_train,
            "n_val": g.n_val,
            **(
                {}
                if g.drift is None
                else {"drift": {"round": g.drift.round, "label_map": dict(g.drift.label_map), "name": g.drift.name}}
            ),
        }
        for g in group_specs(config.data)
    ]


@dataclass
class ModelSide:
    """The backbone, its adapters and the strategy: what a server needs, with no data.

    Built the same way on every side (in-process engine, Flower ServerApp, Flower ClientApp), so the
    shared initialisation and every adapter key agree everywhere.
    """

    classifier: Backbone
    bank: AdapterBank
    strategy: Strategy
    initial_state: dict[str, torch.Tensor]
    settings: LocalTraining
    device: torch.device


def build_model_side(
    config: ExperimentConfig, *, num_labels: int, num_examples: tuple[int, ...], num_slots: int | None = None
) -> ModelSide:
    """Load the backbone (a classifier with ``num_labels`` outputs, or for generation a causal LM, which
    ignores ``num_labels``), inject adapters, and set up the strategy for clients holding
    ``num_examples`` training examples each (their count is the number of clients)."""
    model_cfg = config.model
    device = resolve_device(config.train.device)
    if config.data.resolved_task() == "generation":
        classifier = load_causal_lm(
            model_cfg.name, num_layers=model_cfg.num_layers, quantization=model_cfg.quantization, device=device
        )
    else:
        classifier = load_classifier(model_cfg.name, num_labels, num_layers=model_cfg.num_layers, seed=config.seed)
    strategy_cls = get_strategy(config.method)
    bank = AdapterBank(
        classifier.model,
        target_modules=model_cfg.target_modules,
        expert_names=strategy_cls.experts_for(config.method_options()),
        rank=model_cfg.rank,
        alpha=model_cfg.alpha,
        dropout=model_cfg.dropout,
        local_modules=classifier.head_modules if model_cfg.head == "local" else (),
        num_slots=clients_per_pass(config, device) if num_slots is None else num_slots,
    )
    if not is_quantized(classifier.model):  # a bitsandbytes model is placed while loading and cannot move
        classifier.model.to(device)
    if config.train.compile:
        # In place: the bank, the optimizer and generate() keep the same module; only its call is compiled.
        classifier.model.compile()
    context = FederationContext(
        num_clients=len(num_examples),
        sites=tuple(bank.sites),
        num_layers=bank.num_layers,
        module_names=tuple(model_cfg.target_modules),
        num_rounds=config.federation.rounds,
        num_examples=tuple(num_examples),
        seed=config.seed,
        rank=model_cfg.rank,
        state_shapes=bank.state_shapes(),
        server_device=resolve_server_device(config.federation.server_device),
        membership=membership_of(config, len(num_examples)),
    )
    strategy = strategy_cls(config.method_options(), context)
    generator = torch.Generator().manual_seed(config.seed)
    initial_state = strategy.initial_state(generator)
    # A local head starts from the shared random head every client loaded.
    initial_state.update({k: v for k, v in bank.read_slot(0).items() if k in bank.local_parameters})
    settings = local_training(config, device.type)
    return ModelSide(classifier, bank, strategy, initial_state, settings, device)


def load_partitioned_data(
    config: ExperimentConfig,
) -> tuple[ClassificationDataset | InstructionDataset, list[ClientData]]:
    """The configured dataset and its per-client partition: Dirichlet label skew for classification
    (per group with ``data.groups``), one task per client for generation."""
    data_cfg = config.data
    if data_cfg.resolved_task() == "generation":
        return _instruction_data(config)
    if data_cfg.groups is not None:
        return load_grouped_data(config)
    dataset = load_configured_classification(config)
    clients = dirichlet_partition(
        dataset.train.labels,
        dataset.validation.labels,
        num_clients=data_cfg.num_clients,
        n_train=data_cfg.n_train,
        n_val=data_cfg.n_val,
        alpha=data_cfg.dirichlet_alpha,
        seed=config.seed,
        num_labels=dataset.train.num_labels,
    )
    return dataset, clients


def load_grouped_data(config: ExperimentConfig) -> tuple[ClassificationDataset, list[ClientData]]:
    """The federation of ``data.groups``: every distinct source loaded once, each group's clients drawn
    from what earlier groups of its source left (see :func:`fedtreelora.data.partition_groups`)."""
    specs = group_specs(config.data)
    sources = load_group_sources(
        specs, train_split=config.data.train_split, validation_split=config.data.validation_split
    )
    return partition_groups(specs, sources, seed=config.seed, frozen_head=config.model.head == "frozen")


def load_configured_classification(config: ExperimentConfig, source: str | None = None) -> ClassificationDataset:
    """Labelled texts read with the config's ``data.*_column`` and split options.

    Args:
        source: what to read (default ``data.dataset``), e.g. a deployment site's own folder.
    """
    d = config.data
    return load_classification(
        d.dataset if source is None else source,
        text_column=d.text_column,
        text_pair_column=d.text_pair_column,
        label_column=d.label_column,
        hub_config=d.hub_config,
        train_split=d.train_split,
        validation_split=d.validation_split,
    )


def load_configured_instructions(
    config: ExperimentConfig, source: str | None = None, *, task_column: str | None = None, select_tasks: bool = True
) -> InstructionDataset:
    """Instruction data read with the config's ``data.*_column`` and split options.

    Args:
        source: what to read (default ``data.dataset``), e.g. a deployment site's own folder.
        task_column: the task column when ``data.task_column`` is unset (a site's files carry one).
        select_tasks: keep only ``data.tasks`` (a site keeps all of its own: it holds some of them).
    """
    d = config.data
    return load_instructions(
        d.dataset if source is None else source,
        columns=InstructionColumns(
            instruction=d.instruction_column,
            input=d.input_column,
            output=d.output_column,
            category=d.category_column,
            task=d.task_column or task_column,
        ),
        tasks=d.tasks if select_tasks else None,
        hub_config=d.hub_config,
        train_split=d.train_split,
        validation_split=d.validation_split,
    )


def encode_split(
    config: ExperimentConfig,
    tokenizer: PreTrainedTokenizerBase,
    split: LabeledTexts | InstructionSet,
    indices: np.ndarray,
) -> EncodedExamples | EncodedInstructions:
    """Tokenize the examples of ``split`` at ``indices`` ((k,) int array) once, as local training takes them."""
    part = split.subset(indices)
    if isinstance(part, InstructionSet):
        return encode_instructions(
            tokenizer,
            part.instructions,
            part.inputs,
            part.outputs,
            max_length=config.model.max_length,
            max_new_tokens=config.generation.max_new_tokens,
        )
    return encode(tokenizer, part.texts, part.text_pairs, part.labels, config.model.max_length)


def _instruction_data(config: ExperimentConfig) -> tuple[InstructionDataset, list[ClientData]]:
    data_cfg = config.data
    dataset = load_configured_instructions(config)
    tasks = dataset.task_names
    clients = task_partition(
        dataset.train.task_ids(tasks),
        dataset.validation.task_ids(tasks),
        num_clients=data_cfg.num_clients,
        n_train=data_cfg.n_train,
        n_val=data_cfg.n_val,
        seed=config.seed,
        num_tasks=len(tasks),
    )
    return dataset, clients


def upload_chain(config: ExperimentConfig, initial_state: dict[str, torch.Tensor]) -> tuple[UploadTransform, ...]:
    """The run's upload transforms from its config: the clipping and noise of ``privacy`` when it is on
    (:class:`fedtreelora.privacy.GaussianUpdate`, measuring updates from the server's payload or
    ``initial_state``), else none."""
    from fedtreelora.privacy import privacy_settings  # the accountant's library only when privacy is asked for

    if not config.privacy.enabled:
        return ()
    settings = privacy_settings(config)
    assert settings is not None
    return (settings.transform(config.seed, initial_state),)


def build_federation(config: ExperimentConfig, *, num_slots: int | None = None) -> Federation:
    """Load data and model, partition clients, inject adapters and set up the strategy.

    ``num_slots`` overrides ``train.clients_per_pass`` (a Flower node trains one client).
    """
    dataset, clients = load_partitioned_data(config)
    num_examples = tuple(len(c.train_indices) for c in clients)
    num_labels = 0 if isinstance(dataset, InstructionDataset) else dataset.train.num_labels
    side = build_model_side(config, num_labels=num_labels, num_examples=num_examples, num_slots=num_slots)
    tok = side.classifier.tokenizer
    train_data = [encode_split(config, tok, dataset.train, c.train_indices) for c in clients]
    val_data = [encode_split(config, tok, dataset.validation, c.val_indices) for c in clients]
    return Federation(
        config,
        dataset,
        clients,
        side.classifier,
        side.bank,
        side.strategy,
        train_data,
        val_data,
        side.initial_state,
        side.settings,
        side.device,
        upload_chain(config, side.initial_state),
        drifted_data(clients, train_data, val_data),
    )
