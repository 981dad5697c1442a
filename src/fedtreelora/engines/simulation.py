"""The in-process engine: one backbone, every client's adapters resident, clients swapped into a slot."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rich.console import Console
from rich.text import Text

from fedtreelora.adapters import PhaseSpec
from fedtreelora.config import ExperimentConfig
from fedtreelora.core.placement import Membership
from fedtreelora.core.structure import ari_by_layer, placement_agreement, planted_levels
from fedtreelora.data import planted_groups
from fedtreelora.engines.checkpoint import RunState, load_checkpoint, save_checkpoint
from fedtreelora.engines.loggers import ScalarLogger
from fedtreelora.engines.recorder import RunRecorder
from fedtreelora.engines.round_table import RoundTable
from fedtreelora.engines.runners import ClientRunner, in_process_runner
from fedtreelora.engines.setup import Federation, FederationView, build_federation
from fedtreelora.engines.validation import RejectedUpdate, check_update
from fedtreelora.errors import ConfigError
from fedtreelora.headline import best_federated, headline, last_seen, round_mean
from fedtreelora.progress import progress_bars
from fedtreelora.runfolder import Convention, RunSummary
from fedtreelora.train import ClientResult

if TYPE_CHECKING:
    from fedtreelora.privacy import PrivacyLedger


def run_metric(fed: FederationView) -> str:
    """The per-client metric a federation is scored on (``accuracy``, ``rouge1``)."""
    return fed.metric


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes on the wire for a set of float32 tensors."""
    return sum(t.numel() * 4 for t in tensors.values())


def planted_structure(
    config: ExperimentConfig,
    sharing_labels: np.ndarray | None,
    newcomers: list[int] | None = None,
    rnd: int | None = None,
) -> dict[str, Any]:
    """The summary's record of a federation with planted groups (``data.groups``) as they are in round
    ``rnd`` (0-based; None: the last round, so after every ``drift``); {} without groups.

    ``planted_groups``: (clients,) each client's group; ``planted_levels``: (depth, clients) each
    client's group prefix at depth 1..max; ``ari``: (layers, depth) adjusted Rand index of each layer's
    sharing partition against each depth, None when the method records no sharing partition;
    ``placement_agreement`` (with late clients placed in the tree, ``newcomers``): (layers, depth) the
    share of them placed in a cluster mostly of their own planted group
    (:func:`~fedtreelora.core.structure.placement_agreement`; NaN written as None).
    """
    planted = planted_groups(config.data, config.federation.rounds - 1 if rnd is None else rnd)
    if planted is None:
        return {}
    levels = planted_levels(planted)
    ari = None if sharing_labels is None else ari_by_layer(sharing_labels, levels).tolist()
    record: dict[str, Any] = {"planted_groups": planted, "planted_levels": levels, "ari": ari}
    if newcomers and sharing_labels is not None:
        agreement = placement_agreement(sharing_labels, levels, newcomers)
        record["placement_agreement"] = [[None if np.isnan(v) else float(v) for v in row] for row in agreement]
    return record


def phase_record(phase: PhaseSpec) -> dict[str, Any]:
    """How a phase mixes a client's experts, as the clients' model description records it (what an
    export needs)."""
    return {
        "name": phase.name,
        "mixer": phase.mixer,
        "experts": list(phase.expert_names),
        "fixed_weights": phase.fixed_weights,
        "single_layers": sorted(phase.single_layers),
        "residual": [e.name for e in phase.experts if e.residual],
    }


def _personal(fed: FederationView) -> bool:
    """The strategy adds a personal expert (``fedtreelora.personal``): one cluster everywhere is then not FedIT."""
    return bool(getattr(getattr(fed.strategy, "options", None), "personal", False))


def by_phase(phases: dict[int, PhaseSpec]) -> list[tuple[PhaseSpec, list[int]]]:
    """Clients grouped by the phase they run in (client -> phase), groups in order of their first
    client, clients ascending within a group: one group when every client runs the round's phase."""
    groups: list[tuple[PhaseSpec, list[int]]] = []
    for k in sorted(phases):
        for phase, members in groups:
            if phase == phases[k]:
                members.append(k)
                break
        else:
            groups.append((phases[k], [k]))
    return groups


def membership_record(membership: Membership, rnd: int, present: list[int]) -> dict[str, Any]:
    """A round record's membership fields (runs with ``federation.join`` or ``leave``): ``present``, the
    clients in the federation in round ``rnd``; ``joined`` / ``left``, those who arrived / went at it."""
    joined = [k for k in present if membership.joins(k) == rnd and rnd > 0]
    left = sorted(k for k, r in membership.leave.items() if r == rnd)
    return {"present": present, **({"joined": joined} if joined else {}), **({"left": left} if left else {})}


class SimulationEngine:
    """Runs a whole federation in one process.

    The model is built once; each client's adapter state lives off the model (CPU tensors) and is
    written into the adapter slot before the client trains, read back after. Rounds: the strategy
    decides each round's phase (e.g. FedTreeLoRA's warm-up), payloads and aggregation.

    The round loop reaches the clients through a :class:`~fedtreelora.engines.runners.ClientRunner`;
    an engine whose clients live elsewhere (Flower) gives its own federation view and runner in
    :meth:`setup`.
    """

    #: whether this engine can sum uploads securely (``privacy.secure_aggregation``): only on Flower,
    #: where clients are other machines; in one process there is no server to hide an upload from.
    secure_aggregation: bool = False

    def __init__(
        self,
        config: ExperimentConfig,
        out_dir: str | Path | None = None,
        *,
        quiet: bool = False,
        resume: bool = False,
        report: bool = True,
        console: Console | None = None,
    ) -> None:
        if config.privacy.secure_aggregation and not self.secure_aggregation:
            raise ConfigError(
                "privacy.secure_aggregation=true needs the Flower engine (`fedtreelora flower ...`), where "
                "clients are separate nodes; in one process there is no server to hide an upload from: "
                "set privacy.secure_aggregation=false or run on Flower"
            )
        self.config = config
        self.resume = resume
        self.report = report
        self.recorder = RunRecorder(out_dir)
        self.quiet = quiet
        self.console = console or Console(stderr=True, quiet=quiet)
        self._ledger: PrivacyLedger | None = None

    def privacy(self, num_clients: int) -> PrivacyLedger | None:
        """The run's privacy ledger (epsilon after each round), or None when ``privacy`` is off."""
        if not self.config.privacy.enabled:
            return None
        if self._ledger is None:
            from fedtreelora.privacy import PrivacyLedger, privacy_settings

            settings = privacy_settings(self.config)
            assert settings is not None
            self._ledger = PrivacyLedger(settings, num_clients)
        return self._ledger

    def run(self) -> dict[str, Any]:
        """Run every round (from the last checkpoint when resuming); return the summary (also
        written to the run folder)."""
        start = time.perf_counter()
        cfg = self.config
        with self.console.status("loading data and model"):
            fed, runner = self.setup()
        run = self._start_state(fed)
        if run.next_round == 0:
            self.recorder.write_config(cfg)
            self.recorder.write_partition(fed.partition_record())
        self.console.print(
            f"[bold]{cfg.method}[/] on {fed.dataset_name}: {fed.num_clients} clients, "
            f"{len(fed.bank.sites)} adapted modules in {fed.bank.num_layers} layers, device {fed.device}"
            + (f"; resuming at round {run.next_round + 1}" if run.next_round else "")
        )
        progress = progress_bars(self.console, quiet=self.quiet)
        every = cfg.federation.checkpoint_every
        scalars = None
        if self.recorder.out_dir is not None and (cfg.logging.tensorboard or cfg.logging.wandb):
            scalars = ScalarLogger(
                self.recorder.out_dir, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
                run_name=f"{cfg.method}-{fed.dataset_name}-seed{cfg.seed}", config=cfg.model_dump(mode="json"),
                first_step=run.next_round + 1,
            )  # fmt: skip
            if scalars.notice:
                self.console.print(f"[yellow]{scalars.notice}[/]")
        with progress:
            rounds_task = progress.add_task("rounds", total=cfg.federation.rounds, completed=run.next_round)
            clients_task = progress.add_task("clients", total=fed.num_clients)
            table = RoundTable(cfg.federation.rounds, fed.num_clients, run_metric(fed), cfg.federation.evaluate)
            for rnd in range(run.next_round, cfg.federation.rounds):
                progress.reset(clients_task, total=fed.num_clients)
                round_start = time.perf_counter()
                record = self._round(fed, runner, rnd, run, lambda: progress.advance(clients_task))
                run.history.append(record)
                run.next_round = rnd + 1
                progress.advance(rounds_task)
                # Every client scored this round (under `trained`, the participants; a client whose
                # evaluation did not come back has no value this round).
                values = [v for acc in run.per_client if (v := acc[-1]) is not None]
                progress.console.print(table.row(record, values, time.perf_counter() - round_start), soft_wrap=True)
                if "cuts" in (record.get("server") or {}):  # the round the clusters were made
                    # Through the same console as the rows: --quiet silences it with them (the line is in
                    # the run summary and the report, and `run --quiet` prints it at the end), so that a quiet
                    # run (as every run of `compare`) adds nothing to its caller's output.
                    finding = RunSummary(self._clustering(fed, rnd)).clustering_finding(_personal(fed))
                    if finding is not None:
                        progress.console.print(Text(finding, style="bold cyan"), soft_wrap=True)
                if scalars is not None:
                    scalars.log_round(record, [acc[-1] for acc in run.per_client])
                if self.recorder.out_dir is not None and every and (run.next_round % every == 0):
                    run_wall = run.wall_seconds
                    run.wall_seconds = run_wall + time.perf_counter() - start
                    save_checkpoint(self.recorder.out_dir, run, fed.strategy)
                    run.wall_seconds = run_wall
        if scalars is not None:
            scalars.close()
        self.finish(runner, run)
        summary = self._summary(fed, run, run.wall_seconds + time.perf_counter() - start)
        self.recorder.write_client_states(run.client_states, self._model_meta(fed, run), run.received_states())
        self.recorder.write_summary(summary)
        if self.recorder.out_dir is not None and self.report:
            from fedtreelora.report import write_report  # matplotlib only when a report is written

            html, _ = write_report(self.recorder.out_dir)
            self.console.print(f"report: {html}")
        return summary

    def setup(self) -> tuple[FederationView, ClientRunner]:
        """This run's federation as the server side sees it, and the runner that reaches its clients:
        here data, model, adapters and strategy in this process (an engine whose clients live elsewhere
        builds only the model side)."""
        fed = self.build_federation()
        return fed, in_process_runner(fed)

    def build_federation(self) -> Federation:
        """Data, model, adapters and strategy for this run, in this process."""
        return build_federation(self.config)

    def _start_state(self, fed: FederationView) -> RunState:
        """A fresh state, or the latest checkpoint when resuming (metrics past it are dropped)."""
        if self.resume and self.recorder.out_dir is not None:
            state = load_checkpoint(self.recorder.out_dir, fed.strategy)
            if state is not None:
                self.recorder.truncate_metrics(state.next_round)
                return state
        self.recorder.truncate_metrics(0)
        if self.recorder.folder is not None:
            # A fresh run in a used folder: an older run's checkpoint must never be resumed into this one.
            shutil.rmtree(self.recorder.folder.checkpoints, ignore_errors=True)
        return RunState(
            next_round=0,
            client_states=[dict(fed.initial_state) for _ in range(fed.num_clients)],
            per_client=[[] for _ in range(fed.num_clients)],
        )

    def participants(self, rnd: int, num_clients: int, present: list[int] | None = None) -> list[int]:
        """Clients sampled for round ``rnd``: a ``federation.fraction_train`` share of the clients
        ``present`` that round (None: all ``num_clients``), drawn from ``(seed, round)`` so a resumed run
        samples the same clients."""
        pool = list(range(num_clients)) if present is None else list(present)
        fraction = self.config.federation.fraction_train
        if fraction >= 1.0:
            return pool
        count = max(1, round(fraction * len(pool)))
        rng = np.random.default_rng([self.config.seed, rnd, 0x5A4D])
        return sorted(np.asarray(pool)[rng.choice(len(pool), size=count, replace=False)].tolist())

    def _round(
        self, fed: FederationView, runner: ClientRunner, rnd: int, run: RunState, tick: Callable[[], None]
    ) -> dict[str, Any]:
        """Round ``rnd``: sample, send payloads, train (through ``runner``), validate and aggregate the
        uploads, score what the clients receive; returns the round's record."""
        strategy = fed.strategy
        phase = strategy.phase(rnd)
        shapes = fed.bank.state_shapes()
        max_norm = self.config.federation.max_update_norm
        membership = strategy.context.membership
        present = strategy.context.present(rnd)
        chosen = self.participants(rnd, fed.num_clients, present if membership.changes else None)
        payloads = {k: strategy.payload(rnd, k) for k in chosen}
        keys = {k: list(strategy.upload_keys(rnd, k)) for k in chosen}
        phases = {k: strategy.client_phase(rnd, k) for k in chosen}
        results: dict[int, ClientResult] = {}
        for group_phase, group in by_phase(phases):
            results.update(
                runner.train(
                    rnd, group_phase, {k: payloads[k] for k in group}, {k: keys[k] for k in group},
                    run.client_states, tick,
                )
            )  # fmt: skip
        ledger = self.privacy(fed.num_clients)
        # What the server saw this round (accepted or not), and the privacy spent once it has.
        privacy = {} if ledger is None else ledger.round_fields(run.history, [k for k in results if keys[k]])
        uploads: dict[int, dict[str, torch.Tensor]] = {}
        records: list[dict[str, Any]] = []
        rejected: list[int] = []
        for k in sorted(results):
            result = results[k]
            upload = self.tamper(rnd, k, result.upload)
            try:
                check_update(k, upload, keys[k], shapes, max_norm)
            except RejectedUpdate as exc:
                # The client keeps its state from before this round; the others aggregate without it.
                self.console.print(f"[yellow]round {rnd + 1}: rejected update: {exc}[/]")
                rejected.append(k)
                continue
            run.client_states[k] = result.state
            uploads[k] = upload
            # A runner that sent something else than the upload (a masked vector) says how many bytes.
            metrics = dict(result.metrics)
            sent = metrics.pop("uplink_bytes", None)
            records.append(
                {
                    "round": rnd,
                    "client": k,
                    "phase": phases[k].name,
                    **metrics,
                    "uplink_bytes": tensor_bytes(upload) if sent is None else int(sent),
                    "downlink_bytes": tensor_bytes(payloads[k]),
                }
            )
        info = strategy.aggregate(rnd, uploads)
        metric = run_metric(fed)
        trained = [r["client"] for r in records]
        runner.settle(chosen, trained)
        received = self._evaluate_received(fed, runner, rnd, trained, run, present)
        for r in records:
            r.update(
                {Convention.RECEIVED.score_key(key): value for key, value in received.get(r["client"], {}).items()}
            )
        # Clients whose training did not count this round (not sampled, update rejected): only the model
        # they would receive is scored, in a record marked as such.
        sat_out = [
            {
                "round": rnd,
                "client": k,
                "phase": strategy.client_phase(rnd, k).name,
                "trained": False,
                **{Convention.RECEIVED.score_key(key): value for key, value in received[k].items()},
            }
            for k in sorted(set(received) - set(trained))
        ]
        score_key = Convention(self.config.federation.evaluate).score_key(metric)
        scored = sorted([*records, *sat_out], key=lambda r: r["client"])
        if ledger is not None:
            own = ledger.client_epsilons([*run.history, privacy])
            for r in scored:
                r.update({"epsilon": privacy["epsilon"], "epsilon_server": own[r["client"]]})
        scores = {r["client"]: r.get(score_key) for r in scored}
        for k in range(fed.num_clients):
            run.per_client[k].append(scores.get(k))
        self.recorder.log_clients(scored)

        def mean(key: str) -> float | None:
            values = [r[key] for r in scored if r.get(key) is not None]
            return float(np.mean(values)) if values else None

        return {
            "round": rnd,
            "phase": phase.name,
            "clients": trained,
            "rejected": rejected,
            "metric": metric,
            "evaluate": self.config.federation.evaluate,
            "mean_metric": mean(score_key),
            f"mean_{metric}": mean(score_key),
            **{c.mean_key: mean(c.score_key(metric)) for c in (Convention.TRAINED, Convention.RECEIVED)},
            "mean_train_loss": mean("train_loss"),
            "uplink_mb_per_client": (mean("uplink_bytes") or 0.0) / 1e6,
            "downlink_mb_per_client": (mean("downlink_bytes") or 0.0) / 1e6,
            **privacy,
            **(membership_record(membership, rnd, present) if membership.changes else {}),
            **({"server": info} if info else {}),
        }

    def _evaluate_received(
        self,
        fed: FederationView,
        runner: ClientRunner,
        rnd: int,
        trained: list[int],
        run: RunState,
        present: list[int] | None = None,
    ) -> dict[int, dict[str, Any]]:
        """After round ``rnd``'s aggregation, the scores of what every client in the federation that round
        (``present``; None: every client) receives, whether it trained this round or not: its kept state
        plus the server's payload for it for round ``rnd + 1``, in its phase of that round (after the last
        round: the final aggregation). Scored with round ``rnd``'s client seeds, so where nothing is
        received (warm-up, local training) the score equals the trained one exactly. ``trained``: the
        clients whose update counted this round (their state changed).

        Each scored client's payload and round go into ``run`` (its received model, saved at the end);
        a client of ``trained`` whose score did not come back keeps none, since its state has changed
        since; any other client whose score did not come back keeps the one it was last scored on."""
        strategy = fed.strategy
        clients = range(fed.num_clients) if present is None else present
        payloads = {k: strategy.payload(rnd + 1, k) for k in clients}
        scores: dict[int, dict[str, Any]] = {}
        for phase, group in by_phase({k: strategy.client_phase(rnd + 1, k) for k in clients}):
            scores.update(runner.evaluate_received(rnd, phase, {k: payloads[k] for k in group}, run.client_states))
        changed = set(trained)
        for k in clients:
            if k in scores:
                run.received_payloads[k], run.received_rounds[k] = payloads[k], rnd + 1
            elif k in changed:
                run.received_payloads.pop(k, None)
                run.received_rounds.pop(k, None)
        return scores

    def finish(self, runner: ClientRunner, run: RunState) -> None:
        """Called after the last round, before states and summary are written: the final states of
        clients the engine does not hold (none in process) go into ``run.client_states``."""
        for k, state in runner.finish().items():
            run.client_states[k] = state

    def tamper(self, rnd: int, client: int, upload: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The upload as it reaches the server. Identity here; fault-injection tests override it."""
        return upload

    @staticmethod
    def _model_meta(fed: FederationView, run: RunState) -> dict[str, Any]:
        """The clients' model description (:attr:`~fedtreelora.runfolder.RunFolder.client_meta`): what
        rebuilds the model around the saved states, with the phase each model was scored in:
        ``final_phase`` for the trained states (the last round's; a client whose last round was a
        warm-up round was trained in that), ``received_phase`` for the received ones (the phase after
        the last round, the final aggregation's) and ``received_phase_of_client`` for a client whose
        received model was scored in another phase (its score did not come back in the last rounds, or
        it was still in its own warm-up after joining late, ``federation.join``)."""
        cfg = fed.config
        rounds = cfg.federation.rounds
        received_phase = phase_record(fed.strategy.phase(rounds))
        other_phases = {
            str(k): record
            for k, rnd in sorted(run.received_rounds.items())
            if (record := phase_record(fed.strategy.client_phase(rnd, k))) != received_phase
        }
        return {
            "method": cfg.method,
            "model": cfg.model.model_dump(mode="json"),
            "task": fed.task,
            "num_labels": fed.num_labels,
            "label_names": fed.label_names,
            "seed": cfg.seed,
            "experts": list(fed.bank.expert_names),
            "final_phase": phase_record(fed.strategy.phase(rounds - 1)),
            "received_phase": received_phase,
            **({"received_phase_of_client": other_phases} if other_phases else {}),
            "head_modules": fed.classifier.head_modules,
            "sites": [
                {"name": s.name, "layer": s.layer, "module": s.module, "d_in": s.d_in, "d_out": s.d_out}
                for s in fed.bank.sites
            ],
        }

    @staticmethod
    def _newcomers(fed: FederationView) -> list[int]:
        """The late clients the strategy placed in its tree (``placements`` of its summary)."""
        return sorted({int(p["client"]) for p in fed.strategy.summary().get("placements") or []})

    def _clustering(self, fed: FederationView, rnd: int) -> dict[str, Any]:
        """The summary's fields that say what the clusters are (plan or clusters, labels, label counts,
        planted groups), as they stand after round ``rnd``."""
        labels = fed.strategy.sharing_labels()
        return {
            **fed.strategy.summary(),
            "labels": None if labels is None else labels.tolist(),
            "label_counts": fed.label_counts,
            **planted_structure(fed.config, labels, rnd=rnd),
        }

    def _summary(self, fed: FederationView, run: RunState, wall: float) -> dict[str, Any]:
        history = run.history
        means = [-1.0 if (mean := round_mean(h)) is None else mean for h in history]
        best = int(np.argmax(means))
        labels = fed.strategy.sharing_labels()
        fed.bank.configure(fed.strategy.phase(len(history) - 1))
        trainable = fed.bank.trainable_per_client()  # one client's share in the last round's phase
        backbone = sum(p.numel() for p in fed.classifier.model.parameters()) - sum(
            p.numel()
            for layer in fed.bank.layers.values()
            for n, p in layer.named_parameters()
            if not n.startswith("base.")
        )

        categories = fed.client_categories()
        per_client_final = [last_seen(acc) for acc in run.per_client]
        per_client_best = [last_seen(acc[: best + 1]) for acc in run.per_client]
        federated_mean, federated_round = best_federated(history)
        per_client_federated = [
            None if federated_round is None else last_seen(acc[: federated_round + 1]) for acc in run.per_client
        ]
        summary: dict[str, Any] = {
            "method": fed.config.method,
            "dataset": fed.dataset_name,
            "by_convention": {c.value: headline(history, c.mean_key) for c in Convention},
            "metric": run_metric(fed),
            "num_clients": fed.num_clients,
            "rounds": len(history),
            "evaluate": fed.config.federation.evaluate,
            "final_mean": round_mean(history[-1]),
            "best_mean": round_mean(history[best]),
            "best_round": best,
            "best_federated_mean": federated_mean,
            "best_federated_round": federated_round,
            "per_client": per_client_final,
            "per_client_best_round": per_client_best,
            "per_client_best_federated_round": per_client_federated,
            "cuts": None if labels is None else [len({v for v in row if v >= 0}) for row in labels.tolist()],
            "labels": None if labels is None else labels.tolist(),
            "label_counts": fed.label_counts,
            **({"client_categories": categories} if categories is not None else {}),
            **planted_structure(fed.config, labels, self._newcomers(fed)),
            "trainable_params_per_client": trainable,
            "backbone_params": backbone,
            "trainable_percent": 100.0 * trainable / backbone,
            "history": history,
            "wall_seconds": wall,
            **fed.strategy.summary(),
        }
        ledger = self.privacy(fed.num_clients)
        if ledger is not None:
            summary["privacy"] = ledger.summary(history)
        finding = RunSummary(summary).clustering_finding(_personal(fed))
        if finding is not None:
            summary["finding"] = finding
        prior = RunSummary(summary).label_prior()
        if prior is not None:
            summary["label_prior"] = prior.to_dict()
        return summary
