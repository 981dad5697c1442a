"""Label-skewed client partitions: Dirichlet label proportions per client, shared by its train and
validation sets (the paper's protocol)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtreelora.errors import ConfigError


@dataclass(frozen=True)
class LabelDrift:
    """A client's labels from a known round on (``data.groups[i].drift``): the same examples, relabelled."""

    round: int
    """The first round (0-based) in which the client trains and is validated on these labels."""
    train_labels: np.ndarray
    """(n_train,) int64 label ids of the client's training examples from ``round`` on, in the order of
    :attr:`ClientData.train_indices`."""
    val_labels: np.ndarray
    """(n_val,) int64 label ids of its validation examples from ``round`` on, in the order of
    :attr:`ClientData.val_indices`."""


@dataclass(frozen=True)
class ClientData:
    """One client's share of the data.

    Indices point into the dataset's train pool and validation pool respectively; counts and
    proportions have shape ``(num_labels,)``.
    """

    client: int
    train_indices: np.ndarray
    """(n_train,) int64 indices into ``dataset.train``, shuffled."""
    val_indices: np.ndarray
    """(n_val,) int64 indices into ``dataset.validation``, shuffled."""
    proportions: np.ndarray
    """(num_labels,) float64 Dirichlet draw for this client (sums to 1)."""
    train_label_counts: np.ndarray
    """(num_labels,) int64 examples per class actually drawn for training."""
    val_label_counts: np.ndarray
    """(num_labels,) int64 examples per class actually drawn for validation."""
    drift: LabelDrift | None = None
    """The client's labels from a later round on (a group with ``drift``); None: the pool's labels
    hold for the whole run. The counts above are those before the drift."""


class _ClassPools:
    """Per-class pools of example indices, each shuffled once, consumed front to back.

    Drawing from the front of a shuffled pool is sampling without replacement, and because every
    client draws from the same pools, clients never share an example.
    """

    def __init__(self, labels: np.ndarray, num_labels: int, rng: np.random.Generator) -> None:
        self.pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_labels)]
        self.used = np.zeros(num_labels, dtype=np.int64)

    @property
    def remaining(self) -> np.ndarray:
        """(num_labels,) int64 examples still available per class."""
        return np.asarray([p.size for p in self.pools], dtype=np.int64) - self.used

    def take(self, counts: np.ndarray) -> np.ndarray:
        """Remove ``counts[c]`` examples of each class c; returns their indices, shape (counts.sum(),)."""
        parts = []
        for c, k in enumerate(counts):
            parts.append(self.pools[c][self.used[c] : self.used[c] + k])
            self.used[c] += k
        return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, dtype=np.int64)


def _fill_counts(
    wanted: np.ndarray, remaining: np.ndarray, proportions: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Per-class counts close to ``wanted`` that ``remaining`` can supply, with the same total.

    Classes that run short give what they have; the shortfall is redrawn (multinomially) over the
    client's classes that still have examples, in proportion to ``proportions``; if those classes all
    have proportion 0, in proportion to what is left of them. Shapes (num_labels,).
    """
    counts = np.minimum(wanted, remaining)
    short = int(wanted.sum() - counts.sum())
    while short > 0:
        spare = remaining - counts
        open_classes = spare > 0
        if not open_classes.any():
            raise ValueError(f"the pool has too few examples left to draw {int(wanted.sum())}")
        weights = np.where(open_classes, proportions, 0.0)
        if weights.sum() <= 0:
            weights = spare.astype(np.float64)
        extra = rng.multinomial(short, weights / weights.sum())
        counts += np.minimum(extra, spare)
        short = int(wanted.sum() - counts.sum())
    return counts


def _check_labels(labels: np.ndarray, name: str, num_labels: int | None) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integer label ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} has negative label ids")
    if num_labels is not None and arr.size and arr.max() >= num_labels:
        raise ValueError(f"{name} has label id {arr.max()} but num_labels={num_labels}")
    return arr


def _check_pool_size(pool: int, num_clients: int, per_client: int, option: str, pool_name: str) -> None:
    if num_clients * per_client > pool:
        raise ConfigError(
            f"num_clients={num_clients} x {option}={per_client} needs {num_clients * per_client} examples, "
            f"but the {pool_name} pool has only {pool}; lower {option} or num_clients"
        )


def dirichlet_partition(
    train_labels: np.ndarray,
    val_labels: np.ndarray,
    *,
    num_clients: int,
    n_train: int,
    n_val: int,
    alpha: float,
    seed: int,
    num_labels: int | None = None,
) -> list[ClientData]:
    """Give each client ``n_train`` training and ``n_val`` validation examples with label skew.

    Args:
        train_labels: (N_train,) int label ids of the train pool.
        val_labels: (N_val,) int label ids of the validation pool.
        num_clients: number of clients (>= 1).
        n_train: training examples per client (>= 1).
        n_val: validation examples per client (>= 0).
        alpha: Dirichlet concentration (> 0); small values give few dominant classes per client.
        seed: seed of ``np.random.default_rng``; the same inputs and seed give the same partition.
        num_labels: number of classes; default ``max(label) + 1`` over both pools.

    For each client, ``p ~ Dirichlet(alpha * ones(num_labels))``; train counts ``~ Multinomial(n_train,
    p)`` and validation counts ``~ Multinomial(n_val, p)``, so a client's validation set follows its own
    label proportions. Examples are drawn without replacement from per-class pools shared by all
    clients, so clients are disjoint, and train/validation are disjoint because they come from the two
    different pools. Each client's indices are shuffled.

    Shortfall: if a class pool runs out, the client takes what is left of it and the missing examples
    are drawn from the client's other classes that still have examples, in proportion to ``p`` (or to
    what is left of them if ``p`` is zero on all of them). ``*_label_counts`` report what was actually
    drawn; ``proportions`` is the Dirichlet draw.

    Raises:
        ValueError: invalid arguments.
        ConfigError: a pool smaller than ``num_clients * n_train`` (or ``n_val``).
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if n_train < 1:
        raise ValueError(f"n_train must be >= 1, got {n_train}")
    if n_val < 0:
        raise ValueError(f"n_val must be >= 0, got {n_val}")
    if not alpha > 0 or not np.isfinite(alpha):
        raise ValueError(f"alpha must be a positive finite number, got {alpha}")
    if num_labels is not None and num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    train = _check_labels(train_labels, "train_labels", num_labels)
    val = _check_labels(val_labels, "val_labels", num_labels)
    if num_labels is None:
        num_labels = int(max(train.max(initial=-1), val.max(initial=-1))) + 1
        if num_labels < 1:
            raise ValueError("train_labels and val_labels are both empty")
    _check_pool_size(train.size, num_clients, n_train, "n_train", "train")
    _check_pool_size(val.size, num_clients, n_val, "n_val", "validation")

    rng = np.random.default_rng(seed)
    train_pools = _ClassPools(train, num_labels, rng)
    val_pools = _ClassPools(val, num_labels, rng)
    concentration = np.full(num_labels, float(alpha))
    clients = []
    for k in range(num_clients):
        p = rng.dirichlet(concentration)
        train_counts = _fill_counts(rng.multinomial(n_train, p), train_pools.remaining, p, rng)
        val_counts = _fill_counts(rng.multinomial(n_val, p), val_pools.remaining, p, rng)
        clients.append(
            ClientData(
                client=k,
                train_indices=rng.permutation(train_pools.take(train_counts)),
                val_indices=rng.permutation(val_pools.take(val_counts)),
                proportions=p,
                train_label_counts=train_counts.astype(np.int64),
                val_label_counts=val_counts.astype(np.int64),
            )
        )
    return clients


def task_partition(
    train_tasks: np.ndarray,
    val_tasks: np.ndarray,
    *,
    num_clients: int,
    n_train: int,
    n_val: int,
    seed: int,
    num_tasks: int | None = None,
) -> list[ClientData]:
    """One task per client: client k holds task ``k mod num_tasks`` (the paper's NLG federation).

    Args:
        train_tasks: (N_train,) int task id of every example of the train pool.
        val_tasks: (N_val,) int task id of every example of the test pool.
        num_clients: clients (>= num_tasks, so that every task has a client).
        n_train, n_val: examples per client, drawn without replacement from its task's pools (clients
            sharing a task get disjoint examples).
        seed: seed of the draws.
        num_tasks: number of tasks; default ``max(task) + 1``.

    ``proportions`` is one-hot on the client's task, and the label counts count tasks.

    Raises:
        ConfigError: fewer clients than tasks, or a task with too few examples for its clients.
    """
    train = _check_labels(train_tasks, "train_tasks", num_tasks)
    val = _check_labels(val_tasks, "val_tasks", num_tasks)
    if num_tasks is None:
        num_tasks = int(max(train.max(initial=-1), val.max(initial=-1))) + 1
    if num_clients < num_tasks:
        raise ConfigError(
            f"data.num_clients={num_clients} is smaller than the {num_tasks} tasks of the data (one task per "
            "client); raise data.num_clients or keep fewer tasks with data.tasks"
        )
    if n_train < 1 or n_val < 0:
        raise ValueError(f"n_train must be >= 1 and n_val >= 0, got {n_train}, {n_val}")
    rng = np.random.default_rng(seed)
    train_pools = _ClassPools(train, num_tasks, rng)
    val_pools = _ClassPools(val, num_tasks, rng)
    owners = np.arange(num_clients) % num_tasks
    for task in range(num_tasks):
        sharing = int((owners == task).sum())
        for pools, per, option, pool in (
            (train_pools, n_train, "n_train", "train"),
            (val_pools, n_val, "n_val", "test"),
        ):
            have = int(pools.remaining[task])
            if sharing * per > have:
                raise ConfigError(
                    f"task {task} has {have} {pool} examples but its {sharing} client(s) need data.{option}="
                    f"{per} each; lower data.{option}"
                )
    clients = []
    for k in range(num_clients):
        counts_train = np.zeros(num_tasks, dtype=np.int64)
        counts_val = np.zeros(num_tasks, dtype=np.int64)
        counts_train[owners[k]] = n_train
        counts_val[owners[k]] = n_val
        onehot = np.zeros(num_tasks)
        onehot[owners[k]] = 1.0
        clients.append(
            ClientData(
                client=k,
                train_indices=rng.permutation(train_pools.take(counts_train)),
                val_indices=val_pools.take(counts_val),
                proportions=onehot,
                train_label_counts=counts_train,
                val_label_counts=counts_val,
            )
        )
    return clients
