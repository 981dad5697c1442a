"""What a client sends the server: the part of its trained state the strategy asks for, passed through
the run's chain of upload transforms.

Every client round cuts its upload here (one client per pass, several per pass, a Flower node), so a
concern that acts on every upload whatever the method (clipping, noise, masking, in the spirit of
Flower's client mods) is one :class:`UploadTransform` in the chain instead of code in each engine.
The chain is empty by default: the upload is then the state's own tensors for the strategy's keys,
exactly what the server has always received.

A transform sees the upload as absolute tensors (what the server averages) and, through its
:class:`UploadContext`, the received start each tensor was trained from; ``context.delta(upload)`` is
the update a clipping or noise transform works on, ``context.from_delta(delta)`` turns it back into an
upload. ``context.received`` tells which of those starts the server sent (and so knows) and which
are the client's own kept state, which the server has never seen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

__all__ = ["UploadContext", "UploadTransform", "client_upload"]

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class UploadContext:
    """What an upload transform may read besides the upload itself.

    Tensors are keyed like the adapter state (``"{module}.{expert}.lora_A"`` (rank, d_in),
    ``"{module}.{expert}.lora_B"`` (d_out, rank), ``"{module}.mix_logit"`` (), ``"{module}.router"``
    (experts, d_in), ...), CPU float32 as a client's state is held.

    Attributes:
        client: the client's id in the federation; None when the round was run outside an engine
            without one (the engines and the Flower client always give it).
        round: the round, 0-based; None likewise.
        seed: the client's round seed (:func:`fedtreelora.engines.setup.client_seed` in the engines),
            the one that fixed its batches and dropout: a transform that draws noise seeds its own
            generator from it, so an upload does not depend on which clients ran before it.
        start: the received start, every state key as training began: the client's kept state with the
            server's payload in its place (``{**state, **payload}``).
        state: the client's whole state after training (what it keeps), the same keys as ``start``.
        received: the server's payload of this round, the keys of ``start`` that came from the server
            (empty in a round where it sent nothing, e.g. a warm-up round): a transform whose output must
            not reveal the client's kept state (differential privacy) measures the update from these,
            the only starts the server knows.
    """

    client: int | None
    round: int | None
    seed: int
    start: Mapping[str, torch.Tensor]
    state: Mapping[str, torch.Tensor]
    received: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def delta(self, upload: Mapping[str, torch.Tensor]) -> Tensors:
        """What training changed in each uploaded tensor: ``upload[key] - start[key]`` (each of the
        key's shape)."""
        return {key: value - self.start[key] for key, value in upload.items()}

    def from_delta(self, delta: Mapping[str, torch.Tensor]) -> Tensors:
        """The upload an update stands for: ``start[key] + delta[key]`` (inverse of :meth:`delta` up to
        float rounding)."""
        return {key: self.start[key] + value for key, value in delta.items()}


class UploadTransform(Protocol):
    """One link of the upload chain: an upload in, the upload to send instead out.

    It must keep the keys and each tensor's shape (the server rejects an upload whose keys or shapes
    differ from what the strategy asked for) and must not modify its arguments in place (the upload's
    tensors are the client's kept state): return new tensors for what it changes.
    """

    def __call__(self, upload: Tensors, context: UploadContext) -> Tensors:
        """Args:
            upload: key -> tensor, the upload so far (the previous link's output).
            context: the client, round, seed, received start and trained state.
        Returns:
            the upload to pass on, the same keys and shapes.
        """
        ...


def client_upload(
    state: Mapping[str, torch.Tensor],
    start: Mapping[str, torch.Tensor],
    keys: Sequence[str],
    transforms: Sequence[UploadTransform] = (),
    *,
    client: int | None = None,
    rnd: int | None = None,
    seed: int = 0,
    received: Mapping[str, torch.Tensor] | None = None,
) -> Tensors:
    """The upload of one client round: ``state``'s tensors for ``keys``, passed through ``transforms``
    in order.

    With no transforms the upload holds ``state``'s own tensor objects (no copy), as it always has.

    Args:
        state: the client's whole state after training, key -> tensor.
        start: the received start, key -> tensor (the kept state with the payload in place).
        keys: the state keys the strategy asks for (``Strategy.upload_keys``).
        transforms: the run's upload chain, applied first to last.
        client, rnd, seed: the round's client, round and client seed, for :class:`UploadContext`.
        received: the server's payload of this round (:attr:`UploadContext.received`); None: empty.
    Returns:
        key -> tensor for exactly ``keys`` (unless a transform breaks its contract).
    """
    upload = {key: state[key] for key in keys}
    if not transforms:
        return upload
    context = UploadContext(
        client=client, round=rnd, seed=seed, start=start, state=state, received={} if received is None else received
    )
    for transform in transforms:
        upload = transform(upload, context)
    return upload
