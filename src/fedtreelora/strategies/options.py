"""Every built-in method's options: the pydantic classes the configuration schema is built from.

Torch-free on purpose (pydantic and :mod:`fedtreelora.core`'s numpy checks only): reading or validating a
configuration, or listing the methods, must not load torch or the training code. Each strategy module
re-exports its options class (``from fedtreelora.strategies.fedit import FedITOptions`` keeps working).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedtreelora.core.plan import check_tau
from fedtreelora.core.tau_auto import DEFAULT_LEVEL, DEFAULT_PERMUTATIONS, check_auto_settings
from fedtreelora.errors import ConfigError


class StrategyOptions(BaseModel):
    """Options every strategy accepts. Subclasses add their own fields."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


# --- FedIT and the methods derived from it ---------------------------------------------------------

SHARED_LAYERS_FORMS = "all, none, first:K, last:K, or a list of layer indices such as [0, 1, 2]"
"""The accepted forms of ``fedit.shared_layers``, as error messages list them."""

_FIRST_LAST = re.compile(r"^(first|last):(\d+)$")


def parse_shared_layers(value: object) -> str | list[int]:
    """Check the syntax of a ``shared_layers`` value and return its canonical form.

    Args:
        value: ``"all"``, ``"none"``, ``"first:K"``, ``"last:K"`` (K >= 0), a list of distinct
            non-negative layer indices, or the same list as a comma-separated string (``"0,2"``, what
            ``--set fedit.shared_layers=0,2`` gives).
    Returns:
        the string forms as given (whitespace removed), a list sorted ascending.
    Raises:
        ValueError naming the accepted forms (pydantic reports it under the field's name).
    """
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        if text in ("all", "none") or _FIRST_LAST.match(text):
            return text
        if text and all(part.isdigit() for part in text.split(",")):
            return parse_shared_layers([int(part) for part in text.split(",")])
        raise ValueError(f"not a layer selection; use {SHARED_LAYERS_FORMS}")
    if isinstance(value, (list, tuple)):
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
            raise ValueError("layer indices must be non-negative integers")
        if len(set(value)) != len(value):
            raise ValueError("layer indices must be distinct")
        return sorted(value)
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(
            f"a bare number ({value}) is ambiguous: write first:{value} for the first {value} layers, "
            f"or [{value}] for layer {value} alone"
        )
    if isinstance(value, dict):
        raise ValueError("a mapping is not a layer selection: write first:K or last:K with no space after the colon")
    raise ValueError(f"not a layer selection; use {SHARED_LAYERS_FORMS}")


def resolve_shared_layers(
    spec: str | Sequence[int], num_layers: int, field: str = "fedit.shared_layers"
) -> tuple[int, ...]:
    """The layers a ``shared_layers`` selection (in :func:`parse_shared_layers`'s canonical form) names
    in a model with ``num_layers`` adapted layers, ascending.

    Raises:
        ConfigError naming ``field`` and the valid range when K exceeds ``num_layers`` or an index
        is not a layer of the model.
    """
    valid = (
        f"valid for this model ({num_layers} adapted layers): all, none, first:K or last:K with K in "
        f"0..{num_layers}, or layer indices in 0..{num_layers - 1}"
    )
    if spec == "all":
        return tuple(range(num_layers))
    if spec == "none":
        return ()
    if isinstance(spec, str):
        match = _FIRST_LAST.match(spec)
        if match is None:
            raise ConfigError(f"{field}={spec!r} is not a layer selection; use {SHARED_LAYERS_FORMS}")
        k = int(match.group(2))
        if k > num_layers:
            raise ConfigError(f"{field}={spec!r} names more layers than the model has; {valid}")
        return tuple(range(k)) if match.group(1) == "first" else tuple(range(num_layers - k, num_layers))
    outside = [i for i in spec if not 0 <= i < num_layers]
    if outside:
        raise ConfigError(f"{field}={list(spec)!r}: layer(s) {outside} do not exist; {valid}")
    return tuple(sorted(spec))


class FedITOptions(StrategyOptions):
    weighting: Literal["uniform", "examples"] = "uniform"
    """How uploads are averaged: ``uniform`` (equal clients, as in the paper's setup) or by example count."""
    warmup_rounds: int = Field(0, ge=0)
    """Rounds of purely local training before the first average (0: FedAvg from round 1). With the same
    warm-up, FedTreeLoRA with one cluster at every layer (``window=1``) computes exactly this."""
    shared_layers: str | list[int] = "all"
    """Which transformer layers' LoRAs are averaged (FedAvg); the others stay local to each client (never
    sent, never overwritten). ``all``; ``none`` (local training); ``first:K``: layers 0..K-1, nearest the
    input; ``last:K``: the K deepest; or a list of layer indices (``[0, 2]``, or ``0,2`` on the command
    line). K is checked against the model's layers when the run starts (``first:0`` and ``last:0`` mean
    none)."""

    @field_validator("shared_layers", mode="before")
    @classmethod
    def _shared_layers(cls, value: object) -> str | list[int]:
        return parse_shared_layers(value)


class AllLayersOptions(FedITOptions):
    """Options of a FedIT-derived method that shares its federated part in every layer: ``shared_layers``
    is fixed at ``all`` (depth-limited FedAvg is FedIT's ``shared_layers``)."""

    shared_layers: Literal["all"] = "all"
    """Always ``all``: this method shares its federated part in every layer (depth-limited sharing is
    ``fedit.shared_layers``)."""

    @field_validator("shared_layers", mode="before")
    @classmethod
    def _shared_layers(cls, value: object) -> str:
        if value != "all":
            raise ValueError(
                "only 'all' is supported here; depth-limited FedAvg is --method fedit with fedit.shared_layers"
            )
        return "all"


class FFAOptions(AllLayersOptions):
    """FFA-LoRA's options (how B uploads are averaged)."""


class FedSAOptions(AllLayersOptions):
    """FedSA-LoRA's options (how A uploads are averaged)."""


class FedDPAOptions(AllLayersOptions):
    inference: Literal["instance", "fixed"] = "instance"
    """How the two adapters mix at evaluation: FedDPA's instance-wise dynamic weighting, or the fixed
    ``local_weight`` used in training."""
    local_weight: float = Field(0.5, ge=0.0, le=1.0)
    """Weight of the local adapter in training (the global adapter gets 1 - it), and at evaluation
    when ``inference`` is ``fixed`` (the authors' code trains with 0.5 / 0.5)."""
    max_weight: float = Field(0.5, gt=0.0, le=1.0)
    """Instance-wise weighting: the local adapter's weight is max_weight times the mean cosine
    similarity (the authors' code: 0.5)."""
    num_reference: int | None = Field(5, ge=1)
    """Instance-wise weighting: local training instances drawn at random per test instance to
    compare it with (the authors' code: 5); None compares with all of them."""
    pooling: Literal["mean", "cls", "last"] = "mean"
    """Instance representation: the last hidden layer averaged over the non-padding tokens, its first
    ([CLS]) token, or its last non-padding token (the authors' choice for decoders). For instruction data
    the instance is the prompt."""


# --- the other methods ------------------------------------------------------------------------------


class FedALTOptions(StrategyOptions):
    weighting: Literal["uniform", "examples"] = "uniform"
    """How the other clients' LoRAs are averaged into the rest-of-world LoRA: equally or by example count."""


class FedLEASEOptions(StrategyOptions):
    warmup_rounds: int = Field(3, ge=1)
    """Rounds of purely local training before the clients are clustered from their B matrices."""
    max_clusters: int = Field(4, ge=2)
    """Largest number of clusters (experts) tried; the model holds this many experts per module."""
    distance: Literal["cosine", "frobenius"] = "cosine"
    """How B matrices are compared (FedLEASE uses one minus the cosine similarity)."""
    linkage: Literal["average", "complete", "single", "weighted"] = "average"
    """Linkage of the clustering (FedLEASE: average)."""
    weighting: Literal["uniform", "examples"] = "uniform"
    """Expert (and router) averages within a cluster: unweighted or weighted by client example count."""
    router_sharing: Literal["cluster", "local"] = "cluster"
    """``cluster``: the server averages the routers of each cluster's members and sends the mean back, as the
    authors' server does; ``local``: every client keeps its own router (never sent)."""


class FedTreeLoRAOptions(StrategyOptions):
    tau: float | Literal["auto"] = 0.1
    """Score of full sharing (c = 1); a layer leaves the root only when a partition's silhouette beats it.
    0.1 because clients that learn their task (lr 1e-3 on MiniLM) show their planted groups with B/Frobenius
    silhouettes of about 0.1-0.2, which 0.3 never splits; IID clients reach similar values, and the false
    split this causes cost 2 points where a missed one cost 26 (benchmarks/README.md).
    ``auto``: no prior; a finer cut competes only when the clients form groups rather than a continuum
    (a rotation test on the clients' configuration with each client's scale divided out) and a
    relabelling test admits it (its silhouette, measured on the cut of a tree built without the layer,
    beats the ``auto_level`` quantile of its own null, at the layer and at every deeper layer); else the
    layer keeps the previous layer's count (the first layer: 1). A federation without groups, even one
    whose clients differ in every layer by an offset or a moderate B scale, then stays shared everywhere
    with probability about ``auto_level`` or more; a long tail of client scales (lognormal sigma 0.5)
    splits about a third of the time (core/tau_auto.py). Deterministic (``auto_seed``)."""
    auto_level: float = Field(DEFAULT_LEVEL, gt=0.0, lt=1.0)
    """With ``tau: auto``: the test's level, the chance that a federation without structure keeps every
    layer shared (each candidate must beat this quantile of its own null)."""
    auto_permutations: int = Field(DEFAULT_PERMUTATIONS, ge=1)
    """With ``tau: auto``: random relabellings per layer and previous partition (the null's size); at
    least enough for the ``auto_level`` quantile (19 at 0.95). 999 plans 20 clients x 32 layers in
    well under a second."""
    auto_seed: int = Field(0, ge=0)
    """With ``tau: auto``: seed of the relabellings; the same B matrices and seed give the same plan."""
    window: int = Field(2, ge=1)
    """Candidates per layer: c_{l-1} <= c < c_{l-1} + window. 1 keeps every layer shared (FedIT). With
    ``tau: auto``, 3 where three or more groups may be about equally far apart: window 2 lets the first
    split test only two clusters, which such groups do not cut stably (planted-cpu: the three groups on 3
    of 3 seeds with window 3, on 1 of 3 with window 2; benchmarks/README.md)."""
    warmup_rounds: int = Field(3, ge=1)
    """Rounds of purely local training before the tree is built from the clients' B matrices."""
    distance: Literal["frobenius", "cosine"] = "frobenius"
    """How B matrices are compared."""
    linkage: Literal["average", "complete", "single", "weighted"] = "average"
    """Linkage of the one tree (the paper's choice is average)."""
    weighting: Literal["uniform", "examples"] = "uniform"
    """Expert averages: unweighted (the paper) or weighted by client example count."""
    lambda_init: float = Field(0.5, gt=0.0, lt=1.0)
    """Initial weight of the cluster expert against the external expert."""
    cut_mode: Literal["tree", "fixed", "independent"] = "tree"
    """Ablation. ``tree``: the method (one tree, a cut per layer, nested). ``fixed``: the same
    ``fixed_clusters`` clusters of the one tree at every layer. ``independent``: every layer builds its
    own tree on its own distances and picks its count like ``tree`` does (tau, window), so partitions
    need not nest from layer to layer."""
    fixed_clusters: int = Field(4, ge=1)
    """Clusters at every layer when ``cut_mode`` is ``fixed`` (at most the number of clients)."""
    external: Literal["mean", "none", "per_cluster"] = "mean"
    """Ablation. ``mean``: the method (one external expert, the mean of everyone outside the cluster).
    ``none``: no external expert, the cluster expert alone. ``per_cluster``: one frozen expert per other
    cluster of the layer (needs ``max_clusters`` experts; more downlink)."""
    max_clusters: int = Field(4, ge=2)
    """With ``external: per_cluster``: the experts the model holds (its own cluster's and up to
    max_clusters - 1 others); every layer's cut is capped at this many clusters."""
    mixer: Literal["lambda", "router"] = "lambda"
    """Ablation. ``lambda``: the method (one learnable scalar per layer and module). ``router``: a
    per-token softmax router (linear d_in -> experts) per layer and module, trained and kept locally."""
    personal: bool = False
    """Beyond the paper: after warm-up every client also trains a private LoRA (the ``personal`` expert,
    never averaged; see ``personal_init``) that acts at weight 1 on top of the tree's mix at every layer,
    so a client whose data the others pull away keeps its own adapter. Off: the paper's method."""
    personal_init: Literal["zero", "warmup"] = "zero"
    """With ``personal: true``: how the personal expert starts. ``zero``: a fresh LoRA (B = 0, adds nothing
    at first). ``warmup``: the client's own adapter at the end of warm-up (its last warm-up upload, sent
    back with its payloads until it has trained with it, so also to a client first sampled later), so
    the client starts from what local training gave it and the tree's experts add to that."""
    join_warmup_rounds: int | None = Field(None, ge=1)
    """A client that joins after the tree is built (``federation.join``) first trains its own LoRA alone
    for this many rounds, then is placed in the tree; None: ``warmup_rounds`` (its B then compares with
    the others' warm-up B on equal terms)."""
    join_start: Literal["initial", "trunk"] = "initial"
    """Where a late client's own warm-up starts. ``initial``: the shared initialisation, as the others'
    warm-up did (what its B is compared with). ``trunk``: the cluster expert the others share in the
    trunk layers (one cluster) when it joins; the initialisation elsewhere."""
    replan_every: int | None = Field(None, ge=1)
    """Beyond the paper (which builds the tree once): every R federated rounds, rebuild the tree and every
    layer's cut from what the clients uploaded (``replan_from``; each client's personal state is kept);
    every plan is recorded (``plans`` in the summary). None: never."""
    replan_from: Literal["updates", "uploads"] = "updates"
    """With ``replan_every``: what a re-plan reads. ``updates``: the tree's branches stay and each client
    moves to the branches its own learning points along: its B update summed over the rounds since the
    last re-plan (uploaded B minus the B it trained from) against each cluster's expert B (one minus the
    cosine, layer mean), shallow to deep inside its branch of the layer above, once its update points
    away from its own clusters' experts (mean cosine < 0); while it still learns along them it stays. ``uploads``: the tree is rebuilt from every client's
    latest uploaded B; each federated round starts from the client's cluster mix, so that B mostly says
    which cluster a client was in, and a client whose data changed stays there (benchmarks/README.md,
    drift)."""

    @field_validator("tau", mode="before")
    @classmethod
    def _tau(cls, value: Any) -> float | str:
        try:
            return check_tau(value)
        except ValueError:
            raise ValueError("tau must be a number in [-1, 1] (a silhouette threshold) or 'auto'") from None

    @model_validator(mode="after")
    def _consistent(self) -> FedTreeLoRAOptions:
        check_auto_settings(self.auto_level, self.auto_permutations)
        if self.external == "none" and self.mixer != "lambda":
            raise ValueError("external='none' leaves one expert and nothing to mix; keep mixer='lambda' (unused)")
        if self.personal and self.mixer != "lambda":
            raise ValueError("personal=true adds a private expert beside the lambda mixer; use mixer='lambda'")
        if self.personal_init != "zero" and not self.personal:
            raise ValueError("personal_init applies to the personal expert; set personal=true as well")
        if self.external == "per_cluster" and self.cut_mode == "fixed" and self.fixed_clusters > self.max_clusters:
            raise ValueError(
                f"fixed_clusters ({self.fixed_clusters}) exceeds max_clusters ({self.max_clusters}), the experts "
                "that external='per_cluster' holds; raise max_clusters"
            )
        return self
