"""Epsilon as a run goes: read from the rounds' records, so a resumed run counts what it did before."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from fedtreelora.privacy.settings import PrivacySettings

__all__ = ["PrivacyLedger"]


def _finite(value: float) -> float | None:
    """``value``, or None for infinity (no noise: no guarantee), which JSON cannot hold."""
    return None if math.isinf(value) else value


class PrivacyLedger:
    """The privacy spent after each round of a run.

    A round's record carries ``uploaders`` (the clients whose upload reached the server that round,
    accepted or rejected: the server saw them either way). From the records so far:

    * ``epsilon``: at ``delta``, over the rounds with uploads, amplified by the sampling rate: the
      guarantee against a party that does not learn which clients were sampled (the other clients,
      who receive aggregates; anyone who sees the models);
    * ``epsilon_server``: against the server, which samples the clients and sees each upload: client by
      client, its own rounds with an upload, each a full release; the round record holds the largest.

    Args:
        settings: the run's resolved privacy.
        num_clients: clients in the federation.
    """

    def __init__(self, settings: PrivacySettings, num_clients: int) -> None:
        self.settings = settings
        self.num_clients = num_clients

    @staticmethod
    def counts(history: Sequence[Mapping[str, Any]], num_clients: int) -> tuple[int, list[int]]:
        """(rounds with any upload, per client the rounds it uploaded in) over ``history``'s records."""
        steps = 0
        per_client = [0] * num_clients
        for record in history:
            uploaders = record.get("uploaders") or []
            steps += bool(uploaders)
            for k in uploaders:
                per_client[int(k)] += 1
        return steps, per_client

    def client_epsilons(self, history: Sequence[Mapping[str, Any]]) -> list[float | None]:
        """Each client's ``epsilon_server`` after the rounds of ``history`` (None: infinite)."""
        _, per_client = self.counts(history, self.num_clients)
        return [_finite(self.settings.epsilon(n, sampled=False)) for n in per_client]

    def round_fields(self, history: Sequence[Mapping[str, Any]], uploaders: Sequence[int]) -> dict[str, Any]:
        """The privacy fields of a round's record: ``uploaders``, ``epsilon``, ``epsilon_server`` (after
        the rounds of ``history`` and this one, whose uploaders are ``uploaders``)."""
        upto = [*history, {"uploaders": list(uploaders)}]
        steps, per_client = self.counts(upto, self.num_clients)
        worst = max(per_client, default=0)
        return {
            "uploaders": sorted(int(k) for k in uploaders),
            "epsilon": _finite(self.settings.epsilon(steps)),
            "epsilon_server": _finite(self.settings.epsilon(worst, sampled=False)),
        }

    def summary(self, history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The summary's ``privacy`` record: the resolved settings, the rounds with uploads, the final
        ``epsilon`` and ``epsilon_server`` and ``per_client_epsilon_server``."""
        steps, per_client = self.counts(history, self.num_clients)
        return {
            **self.settings.record(),
            "upload_rounds": steps,
            "epsilon": _finite(self.settings.epsilon(steps)),
            "epsilon_server": _finite(self.settings.epsilon(max(per_client, default=0), sampled=False)),
            "per_client_epsilon_server": self.client_epsilons(history),
        }
