"""Export a run's personalized models as standard PEFT LoRA adapters.

Each client's final experts are merged per site into one LoRA (the math is
:mod:`fedtreelora.adapters.export`'s); a run whose mixer weighs its experts per token or per example
cannot be exported and raises :class:`ExportError` naming the mixer. A client has two final models,
each the one an evaluation convention scores (``federation.evaluate``): the ``received`` model (the
default; its kept state with the server's last payload in place of the shared part, the run's
``received_accuracy``) and the ``trained`` one (its state after its last local training, ``accuracy``).

The classification head goes into the adapter through ``modules_to_save``: the shared frozen random
head (rebuilt from the run's seed by :func:`fedtreelora.models.load_classifier`) or the client's own
head (``model.head: local``). Loading therefore needs only the backbone, with the run's number of
layers when the run cut it (``model.num_layers``)::

    from transformers import AutoModelForSequenceClassification
    from peft import PeftModel

    base = AutoModelForSequenceClassification.from_pretrained(BACKBONE, num_labels=NUM_LABELS,
                                                              num_hidden_layers=NUM_LAYERS)
    model = PeftModel.from_pretrained(base, ADAPTER_DIR)

``fedtreelora_export.json`` in the adapter folder records the backbone, label count and layer count.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, get_peft_model

from fedtreelora.adapters.export import ExportError, averaged_factors, expert_weights, merged_factors
from fedtreelora.adapters.layer import MIXERS
from fedtreelora.runfolder import CLIENT_MODELS, ClientModel, RunFolder
from fedtreelora.strategies import STRATEGIES, get_strategy

__all__ = [
    "INFO_FILE",
    "ExportError",
    "client_phase",
    "export_client",
    "export_trunk",
    "last_round_clients",
    "read_meta",
    "trunk_expert",
    "trunk_layers",
]

INFO_FILE = "fedtreelora_export.json"


# --- reading the run ---------------------------------------------------------------------------------------
def read_meta(run_dir: str | Path) -> dict[str, Any]:
    """What rebuilds the model around a finished run's client states (classification runs only)."""
    run = RunFolder(Path(run_dir))
    meta = run.read_client_meta()
    if meta is None:
        raise ExportError(f"{str(run.client_meta)!r} not found: the run has not finished or saved no client adapters")
    if meta.get("task", "classification") != "classification":
        # The PEFT export rebuilds a sequence classifier with its shared head; causal LMs are not wired up yet.
        raise ExportError(
            f"{str(run_dir)!r} is a {meta['task']} run; export writes classification adapters only. The clients' "
            "LoRA tensors are in clients/client_NNN.safetensors (keys '<module>.<expert>.lora_A/lora_B')."
        )
    return meta


def _no_received_models(run: RunFolder) -> ExportError:
    """The error for a run folder written before received models were kept."""
    return ExportError(
        f"{str(run.root)!r} holds no received models ({str(run.received_dir)!r} and the received phase in "
        f"{str(run.client_meta)!r} are missing: the run was written before they were kept). Export the model "
        "after local training with --model trained (model='trained'), or run the experiment again to keep both"
    )


def load_client_state(run_dir: str | Path, client: int, model: ClientModel) -> dict[str, torch.Tensor]:
    """Client ``client``'s final adapter state, received or trained (keys as in
    :class:`fedtreelora.adapters.AdapterBank`).

    Raises:
        ExportError when the run has no such client, or kept no received model for it (a run folder
        written before received models were kept, or a client never scored on one).
    """
    run = RunFolder(Path(run_dir))
    if run.client_state_file(client, model).is_file():
        return run.client_state(client, model)
    if not run.client_state_file(client, "trained").is_file():
        found = run.client_state_files("trained")
        raise ExportError(f"the run holds no client {client} (it saved {len(found)} clients, numbered from 0)")
    if not run.received_dir.is_dir():
        raise _no_received_models(run)
    raise ExportError(
        f"the run kept no received model of client {client}: the server's answer to its last update was never "
        "scored (a client that never took part, or whose evaluation did not come back). Export the model after "
        "local training with --model trained (model='trained')"
    )


def client_phase(
    run_dir: str | Path, meta: Mapping[str, Any], client: int, model: ClientModel = "received"
) -> dict[str, Any]:
    """How client ``client``'s saved experts mix in the model that was scored.

    ``received``: the phase its received model was scored in (``meta["received_phase_of_client"]``
    for a client that sat out the last rounds, else ``meta["received_phase"]``, the phase after the
    last round). ``trained``: the run's final phase (``meta["final_phase"]``), and where a client's last
    round was a warm-up round (it missed every later round), the warm-up phase: warm-up phases train
    and evaluate expert 0 alone, so ``mixer`` becomes ``single``.

    Either way, a method that evaluates with its own mixer (FedDPA with ``inference: instance`` weighs
    its adapters per example) has ``mixer`` set to that mixer (``inference_mixer`` in the phase when
    the run recorded it, else the method's ``inference`` option in the run's config).

    Returns:
        a dict with ``name``, ``mixer``, ``experts``, ``fixed_weights`` and ``residual`` (experts at
        weight 1 outside the mixer; absent in runs that had none).
    Raises:
        ExportError for ``received`` when the run recorded no received phase (written before
        received models were kept).
    """
    run = RunFolder(Path(run_dir))
    method = str(meta.get("method"))
    if model == "received":
        if "received_phase" not in meta:
            raise _no_received_models(run)
        phase = dict((meta.get("received_phase_of_client") or {}).get(str(client)) or meta["received_phase"])
    else:
        phase = dict(meta["final_phase"])
    inference = phase.get("inference_mixer") or (run.read_config_dict().get(method) or {}).get("inference")
    if inference in MIXERS and inference != phase["mixer"]:
        phase["mixer"] = inference
    if model == "received":
        return phase
    rows = [r for r in run.read_client_records() if r.client == client and r.trained]
    if rows and phase.get("name") != "warmup":
        last = max(rows, key=lambda r: r.round)
        if last.phase == "warmup":
            phase.update(name="warmup", mixer="single", residual=[])  # warm-up uses no residual expert
    return phase


# --- writing PEFT adapters ---------------------------------------------------------------------------------
def _load_base(meta: Mapping[str, Any]) -> torch.nn.Module:
    """The run's backbone with the shared random head (same seed), on CPU."""
    from fedtreelora.models import load_classifier

    model_cfg = meta["model"]
    classifier = load_classifier(
        model_cfg["name"], int(meta["num_labels"]), num_layers=model_cfg.get("num_layers"), seed=int(meta["seed"])
    )
    return classifier.model


def _write_adapter(
    meta: Mapping[str, Any],
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    rank: int,
    out_dir: Path,
    *,
    head_state: Mapping[str, torch.Tensor] | None,
    include_head: bool,
    layers: Sequence[int] | None,
    info: Mapping[str, Any],
) -> Path:
    """Wrap the backbone with stock peft, fill in the factors and head, and save the adapter.

    Args:
        factors: site name -> (A (rank, d_in), B (d_out, rank)); every site peft adapts must be present.
        rank: the exported LoRA rank R; ``lora_alpha = alpha * R / r`` keeps the run's scaling alpha / r.
        head_state: the client's own head tensors (``model.head: local``), or None for the shared one.
        include_head: put the head in the adapter (``modules_to_save``).
        layers: restrict the adapter to these blocks (``layers_to_transform``), or None for all.
    """
    model_cfg = meta["model"]
    base = _load_base(meta)
    heads = list(meta.get("head_modules") or [])
    if head_state:
        missing = base.load_state_dict(dict(head_state), strict=False)
        if missing.unexpected_keys:
            raise ExportError(f"head tensors {missing.unexpected_keys} do not belong to the backbone")
    config = LoraConfig(
        r=rank,
        # peft annotates an int, but scales by lora_alpha / r in floating point; a fractional alpha is meant.
        lora_alpha=float(model_cfg["alpha"]) * rank / int(model_cfg["rank"]),  # type: ignore[arg-type]
        lora_dropout=float(model_cfg.get("dropout", 0.0)),
        target_modules=list(model_cfg["target_modules"]),
        layers_to_transform=None if layers is None else [int(x) for x in layers],
        modules_to_save=heads if include_head and heads else None,
        bias="none",
    )
    with warnings.catch_warnings():  # transformers' deprecation notices from inside peft
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(base, config)
    inner = model.get_base_model()  # for LoRA, base_model.model (with a declared type)
    adapted = {
        name for name, module in inner.named_modules() if hasattr(module, "lora_A") and "default" in module.lora_A
    }
    if adapted != set(factors):
        raise ExportError(
            f"peft adapts {sorted(adapted - set(factors))[:4]} but the run has no factors for them, or the run's "
            f"sites {sorted(set(factors) - adapted)[:4]} were not adapted by peft"
        )
    with torch.no_grad():
        for name, (a, b) in factors.items():
            inner.get_parameter(f"{name}.lora_A.default.weight").copy_(a)
            inner.get_parameter(f"{name}.lora_B.default.weight").copy_(b)
    out_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # transformers' deprecation notices from inside peft's save
        warnings.simplefilter("ignore", FutureWarning)
        model.save_pretrained(str(out_dir))
    (out_dir / INFO_FILE).write_text(json.dumps(dict(info), indent=2) + "\n")
    return out_dir


def _load_info(meta: Mapping[str, Any], run_dir: Path, rank: int) -> dict[str, Any]:
    model_cfg = meta["model"]
    from fedtreelora.models import resolve_model_path

    return {
        "run_dir": str(run_dir),
        "method": meta.get("method"),
        "backbone": model_cfg["name"],
        "backbone_path": resolve_model_path(model_cfg["name"]),
        "num_labels": int(meta["num_labels"]),
        "label_names": meta.get("label_names"),
        "num_hidden_layers": model_cfg.get("num_layers"),
        "rank": rank,
        "lora_alpha": float(model_cfg["alpha"]) * rank / int(model_cfg["rank"]),
        "run_rank": int(model_cfg["rank"]),
        "run_alpha": float(model_cfg["alpha"]),
        "load": (
            "base = AutoModelForSequenceClassification.from_pretrained(backbone_path, num_labels=num_labels"
            + (", num_hidden_layers=num_hidden_layers" if model_cfg.get("num_layers") else "")
            + "); model = PeftModel.from_pretrained(base, ADAPTER_DIR)"
        ),
    }


def export_client(run_dir: str | Path, client: int, out_dir: str | Path, *, model: ClientModel = "received") -> Path:
    """Write client ``client``'s personalized model as a PEFT LoRA adapter in ``out_dir``.

    ``model`` picks which of the client's final models, each the one a convention scores:
    ``received`` (the default, ``federation.evaluate: received``, the run's ``received_accuracy``) is
    the client's kept state with the shared part replaced by the server's last payload (for FedIT the
    global adapter); ``trained`` (``accuracy``) is its state after its last local training. Each is
    exported in the phase it was scored in.

    The client's experts are merged per site into one LoRA of rank E * r (E experts of that phase: 2r
    for FedTreeLoRA, r for single-expert methods), see the module docstring; the head (shared or the
    client's own) is saved through ``modules_to_save``.

    Args:
        run_dir: a finished run folder (with its clients' saved states).
        client: client index, from 0.
        out_dir: adapter folder to write (created).
        model: ``received`` or ``trained``.
    Returns:
        ``out_dir``.
    Raises:
        ExportError when the run's mixer is not a constant mix (``router``, ``instance``), the client
        does not exist, or (``received``) the run folder kept no received model for it.
    """
    if model not in CLIENT_MODELS:
        raise ExportError(f"unknown model {model!r}; one of {', '.join(CLIENT_MODELS)}")
    run = Path(run_dir)
    meta = read_meta(run)
    state = load_client_state(run, client, model)
    phase = client_phase(run, meta, client, model)
    method = str(meta.get("method"))
    sites = [s["name"] for s in meta["sites"]]
    factors = {site: merged_factors(phase, state, site, method) for site in sites}
    rank = int(next(iter(factors.values()))[0].shape[0])
    heads = list(meta.get("head_modules") or [])
    head_state = {k: v for k, v in state.items() if any(k.startswith(f"{h}.") for h in heads)}
    mixer = phase["mixer"]
    info = _load_info(meta, run, rank)
    info.update(
        {
            "kind": "client",
            "client": client,
            "model": model,
            "phase": phase.get("name"),
            "mixer": mixer,
            "experts": list(phase["experts"])[: rank // int(meta["model"]["rank"])],
            "head": "client's own head" if head_state else "shared random head (run seed)",
            "expert_weights": {
                site: expert_weights(phase, state, site, method) for site in sites if mixer in ("lambda", "fixed")
            },
        }
    )
    return _write_adapter(
        meta, factors, rank, Path(out_dir), head_state=head_state, include_head=True, layers=None, info=info
    )


def trunk_layers(run_dir: str | Path) -> list[int]:
    """Layers (0-based) where every client is in one cluster, from the run summary's labels (a client
    marked -1, never placed in a cluster, is left out)."""
    summary = RunFolder(Path(run_dir)).require_run_summary()
    labels = summary.labels
    if labels is None:
        raise ExportError(f"the {summary.method} run recorded no per-layer clusters, so it has no trunk")
    return [layer for layer, row in enumerate(labels) if len({v for v in row if v >= 0}) == 1]


def last_round_clients(run_dir: str | Path, num_clients: int) -> list[int]:
    """Clients whose update the server accepted in the run's last round (all when metrics are absent)."""
    rows = [r for r in RunFolder(Path(run_dir)).read_client_records() if r.trained]
    if not rows:
        return list(range(num_clients))
    last = max(r.round for r in rows)
    return sorted({r.client for r in rows if r.round == last})


def trunk_expert(method: str) -> str:
    """The expert every client of ``method`` shares in a trunk layer (:attr:`Strategy.trunk_expert`).

    Raises:
        ExportError when the method has none, or is not a registered method.
    """
    try:
        expert = get_strategy(method).trunk_expert
    except ValueError:  # not a registered method (e.g. a run of a method since removed)
        expert = None
    if expert is None:
        known = sorted(name for name, cls in STRATEGIES.items() if cls.trunk_expert is not None)
        raise ExportError(
            f"the {method} method shares no whole expert across all clients that export_trunk knows of "
            f"(it knows {known}); pass expert= to name one"
        )
    return expert


def export_trunk(run_dir: str | Path, out_dir: str | Path, *, expert: str | None = None) -> Path:
    """Write the federation's shared trunk as a PEFT LoRA adapter (rank r) restricted to its layers.

    The trunk is every layer where all clients are in one cluster (the run summary's labels). There all
    clients train the same shared expert from the same server average each round, so their saved final
    versions differ only by their last round of local training; the trunk is the server's average of
    those of the clients that took part in the last round (A and B averaged separately, by example count
    when the method's ``weighting`` is ``examples``), i.e. what the server would send next. The adapter adapts
    only those layers (``layers_to_transform``) and includes the shared frozen head (not for
    ``model.head: local``, where no head is shared). It carries the shared expert at weight 1: a
    FedTreeLoRA client's own model additionally scales it by its lambda there (its external expert is
    zero at trunk layers).

    Args:
        run_dir: a finished run folder.
        out_dir: adapter folder to write (created).
        expert: the shared expert's name; by default the trunk expert of the run's method
            (:attr:`fedtreelora.strategies.Strategy.trunk_expert`).
    Returns:
        ``out_dir``.
    Raises:
        ExportError when no layer is shared by all clients, the run ended during warm-up (nothing shared
        yet), or the method shares no whole expert.
    """
    run = Path(run_dir)
    folder = RunFolder(run)
    meta = read_meta(run)
    method = str(meta.get("method"))
    if expert is None:
        expert = trunk_expert(method)
    if meta["final_phase"].get("name") == "warmup":
        raise ExportError("the run ended during warm-up: the clients have shared nothing yet, so there is no trunk")
    layers = trunk_layers(run)
    if not layers:
        raise ExportError(
            "no layer is shared by all clients (every layer has two or more clusters), so there is no trunk"
        )
    num_clients = len(folder.client_state_files("trained"))
    clients = last_round_clients(run, num_clients)
    states = [load_client_state(run, k, "trained") for k in clients]
    weights = np.ones(len(states))
    if (folder.read_config_dict().get(method) or {}).get("weighting") == "examples":
        partition = folder.read_partition()
        if partition is None:
            raise ExportError(f"{str(folder.partition)!r} not found: the trunk is weighted by example counts")
        counts = [sum(c["train_label_counts"]) for c in partition["clients"]]
        weights = np.asarray([counts[k] for k in clients], dtype=np.float64)
    sites = [site["name"] for site in meta["sites"] if site["layer"] in layers]
    factors = averaged_factors(states, weights, sites, expert)
    rank = int(meta["model"]["rank"])
    shared_head = meta["model"].get("head", "frozen") != "local"
    info = _load_info(meta, run, rank)
    info.update(
        {
            "kind": "trunk",
            "expert": expert,
            "layers_to_transform": layers,
            "averaged_clients": clients,
            "head": "shared random head (run seed)" if shared_head else "none (clients keep local heads)",
        }
    )
    return _write_adapter(
        meta, factors, rank, Path(out_dir), head_state=None, include_head=shared_head, layers=layers, info=info
    )
