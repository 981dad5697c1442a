"""Read everything a report shows from a run folder, and nothing from anywhere else.

What a run folder holds, and how each file is read, is :class:`fedtreelora.runfolder.RunFolder`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedtreelora.runfolder import ClientRecord, Convention, RunFolder, RunSummary


@dataclass(frozen=True)
class LambdaTable:
    """The learned lambda (weight of the cluster expert) of every client at every adapted site.

    Attributes:
        values: (clients, sites) float64, ``sigmoid(mix_logit)``; NaN at sites of layers every client
            shares, where the cluster expert acts alone and no lambda is used or learned.
        layers: (sites,) the transformer block of each site (0 nearest the input).
        modules: (sites,) the target module of each site, e.g. ``query``.
    """

    values: np.ndarray
    layers: list[int]
    modules: list[str]

    def module_matrix(self, module: str) -> np.ndarray:
        """(clients, layers) lambda of one module, layers in increasing order (NaN where not adapted)."""
        num_layers = max(self.layers) + 1
        out = np.full((self.values.shape[0], num_layers), np.nan)
        for j, (layer, name) in enumerate(zip(self.layers, self.modules, strict=True)):
            if name == module:
                out[:, layer] = self.values[:, j]
        return out


@dataclass
class RunData:
    """One run folder, parsed.

    Attributes:
        run_dir: the folder.
        summary: the run summary.
        metrics: the per-client round records (one per client per round, and score-only records of
            clients that sat a round out).
        partition: the partition record, or None when absent.
        config: the run's config as a plain dict, or {} when absent.
        meta: the clients' model description, or None when the run saved no client states.
    """

    run_dir: Path
    summary: RunSummary
    metrics: list[ClientRecord] = field(default_factory=list)
    partition: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] | None = None

    @property
    def folder(self) -> RunFolder:
        """The run folder, to reach its files."""
        return RunFolder(self.run_dir)

    @property
    def method(self) -> str:
        return self.summary.method or "?"

    @property
    def metric(self) -> str:
        """The per-client metric of the run: ``accuracy`` (classification) or ``rouge1`` (generation)."""
        return self.summary.metric

    @property
    def num_clients(self) -> int:
        return self.summary.num_clients

    @property
    def num_rounds(self) -> int:
        return self.summary.num_rounds

    @property
    def plan(self) -> dict[str, Any] | None:
        """The FedTreeLoRA sharing plan (tree, cuts, labels, scores), or None for methods without one."""
        return self.summary.plan

    @property
    def tree(self) -> np.ndarray | None:
        """(clients - 1, 4) scipy linkage matrix of the client tree, or None when the method has none."""
        plan = self.plan
        if plan is None or not plan.get("tree"):
            return None
        return np.asarray(plan["tree"], dtype=np.float64).reshape(-1, 4)

    @property
    def tree_clients(self) -> list[int] | None:
        """The client of each leaf of :attr:`tree`, in leaf-index order; None without a tree.

        The tree covers every client, or only some (partial participation, late clients, a re-plan
        without the clients that left): the summary's ``tree_clients``, or for runs written before it,
        the clients that uploaded during warm-up, in client order, read from the warm-up rows of
        :attr:`metrics`. When they cannot be matched to the tree's size, leaves are numbered 0..m-1.
        """
        tree = self.tree
        if tree is None:
            return None
        leaves = tree.shape[0] + 1
        if leaves == self.num_clients:
            return list(range(leaves))
        recorded = self.summary.get("tree_clients")  # written by runs whose tree holds some clients only
        if isinstance(recorded, list) and len(recorded) == leaves:
            return [int(c) for c in recorded]
        warmup = set(self.warmup_rounds)  # the method's warm-up, not a late client's own (federation.join)
        warm = sorted({r.client for r in self.metrics if r.phase == "warmup" and r.trained and r.round in warmup})
        return warm if len(warm) == leaves else list(range(leaves))

    @property
    def labels(self) -> np.ndarray | None:
        """(layers, clients) each client's cluster at each layer (-1: not placed in any cluster), or None
        when the run did not record it."""
        labels = self.summary.labels
        if labels is None:
            return None
        return np.asarray(labels, dtype=np.int64).reshape(len(labels), -1)

    @property
    def planted_groups(self) -> list[str] | None:
        """(clients,) each client's planted group (``data.groups``), or None when the run had none."""
        return self.summary.planted_groups

    @property
    def planted_levels(self) -> list[list[str]] | None:
        """(depth, clients) each client's group prefix at every depth of the planted hierarchy, or None."""
        return self.summary.planted_levels

    @property
    def ari(self) -> np.ndarray | None:
        """(layers, depth) adjusted Rand index of each layer's sharing partition against the planted
        groups at each depth (NaN where it could not be scored), or None when the run has none."""
        ari = self.summary.ari
        if ari is None or self.planted_levels is None:
            return None
        values = [[np.nan if v is None else float(v) for v in row] for row in ari]
        return np.asarray(values, dtype=np.float64).reshape(len(values), len(self.planted_levels))

    @property
    def warmup_rounds(self) -> list[int]:
        """0-based rounds whose phase was ``warmup``."""
        return self.summary.warmup_rounds

    @property
    def evaluate(self) -> Convention:
        """The run's headline convention (``federation.evaluate``; :meth:`Convention.of` for runs
        written before the setting existed)."""
        return self.summary.evaluate

    def accuracy_matrix(self, evaluate: Convention | str | None = None) -> np.ndarray:
        """(clients, rounds) each client's metric (:attr:`metric`: accuracy, or ROUGE-1 for generation)
        after each round under ``evaluate`` (default: the run's headline convention); NaN where it was
        not scored (``trained``: rounds it did not train in; ``received``: every client is scored every
        round, but runs written before that scored only the clients that trained)."""
        out = np.full((self.num_clients, self.num_rounds), np.nan)
        convention = self.evaluate if evaluate is None else Convention(evaluate)
        for row in self.metrics:
            r, k, value = row.round, row.client, row.score(self.metric, convention)
            if r < out.shape[1] and k < out.shape[0] and value is not None:
                out[k, r] = value
        return out

    def label_counts(self) -> tuple[np.ndarray, list[str]] | None:
        """((clients, labels) training label counts, label names), or None when unknown."""
        if self.partition is not None:
            counts = np.asarray([c["train_label_counts"] for c in self.partition["clients"]], dtype=np.int64)
            names = list(self.partition.get("label_names") or [])
        elif self.summary.label_counts:
            counts = np.asarray(self.summary.label_counts, dtype=np.int64)
            names = []
        else:
            return None
        if len(names) != counts.shape[1]:
            names = [f"label {j}" for j in range(counts.shape[1])]
        return counts, names

    def client_files(self) -> list[Path]:
        """The saved client state files in client order (empty when the run saved none)."""
        return self.folder.client_state_files()

    def lambdas(self) -> LambdaTable | None:
        """Every client's learned lambda per site, when the final phase mixed experts with lambda."""
        meta = self.meta
        if meta is None or (meta.get("final_phase") or {}).get("mixer") != "lambda":
            return None
        clients = self.folder.saved_clients()
        sites = meta.get("sites") or []
        if not clients or not sites:
            return None
        single = set((meta.get("final_phase") or {}).get("single_layers") or ())
        lambda_sites = [site for site in sites if int(site["layer"]) not in single]
        values = np.zeros((len(clients), len(sites)))
        for row, client in enumerate(clients):
            logits = self.folder.client_arrays(client, [f"{site['name']}.mix_logit" for site in lambda_sites])
            for j, site in enumerate(sites):
                if int(site["layer"]) in single:
                    values[row, j] = np.nan
                    continue
                logit = float(logits[f"{site['name']}.mix_logit"])
                values[row, j] = 1.0 / (1.0 + np.exp(-logit))
        if np.isnan(values).all():  # every layer shared by everyone: no lambda anywhere (FedIT-like)
            return None
        return LambdaTable(values, [int(s["layer"]) for s in sites], [str(s["module"]) for s in sites])


def load_run(run_dir: str | Path) -> RunData:
    """Parse a finished run folder (a summary written before the best federated round was recorded gets
    it from its history: :meth:`fedtreelora.runfolder.RunFolder.require_complete_summary`).

    Raises FileNotFoundError when the run summary is missing (the run has not finished).
    """
    folder = RunFolder(Path(run_dir))
    metrics = folder.read_client_records()
    summary = folder.require_complete_summary(metrics)
    return RunData(
        run_dir=folder.root,
        summary=summary,
        metrics=metrics,
        partition=folder.read_partition(),
        config=folder.read_config_dict(),
        meta=folder.read_client_meta(),
    )
