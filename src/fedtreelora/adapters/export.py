"""Export a run's personalized models as standard PEFT LoRA adapters.

A FedTreeLoRA client computes, at every adapted projection (method.md step 6),
``W0 x + lambda * s * B_c A_c x + (1 - lambda) * s * B_e A_e x`` with ``s = alpha / r``. That is exactly
one LoRA of rank 2r::

    A = [A_c; A_e]                          (2r x d_in)
    B = [lambda B_c, (1 - lambda) B_e]      (d_out x 2r)
    s * B A = lambda s B_c A_c + (1 - lambda) s B_e A_e

PEFT scales a rank-R LoRA by ``lora_alpha / R``; the export writes ``lora_alpha = E * alpha`` for
``R = E * r`` (E experts) so the scaling stays ``alpha / r``. The same holds for any fixed mix of E
experts (``fixed`` mixer: ``B = [w_1 B_1, ..., w_E B_E]``; FedTreeLoRA's ``external: per_cluster``
gives every other cluster ``1 - lambda``; FedDPA with ``inference: fixed``). Methods with one active
expert (FedIT, local training, a run that ended in warm-up) export rank r. A ``router`` mixer
(FedALT, FedLEASE, FedTreeLoRA's ``mixer: router``) or an ``instance`` mixer (FedDPA's instance-wise
inference) weighs the experts per token or per example, which no single LoRA can reproduce; exporting
such a run raises :class:`ExportError` naming the mixer.

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
import yaml
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from fedtreelora.adapters.inject import layer_index
from fedtreelora.adapters.layer import MIXERS
from fedtreelora.errors import ConfigError

#: The expert every client shares in full (both factors) wherever all clients are in one cluster.
#: Methods not listed here share no whole expert (e.g. FedSA-LoRA keeps B local) or are not known yet.
SHARED_EXPERT: dict[str, str] = {"fedtreelora": "cluster", "fedit": "shared", "ffa": "shared"}

#: Mixers whose expert weights are constants per site, so that the mix is one LoRA.
EXPORTABLE_MIXERS = ("single", "lambda", "fixed")

INFO_FILE = "fedtreelora_export.json"


class ExportError(ConfigError):
    """The run cannot be exported as requested (e.g. a router mixer, a missing client)."""


# --- reading the run ---------------------------------------------------------------------------------------
def read_meta(run_dir: str | Path) -> dict[str, Any]:
    """``clients/meta.json`` of a finished run."""
    path = Path(run_dir) / "clients" / "meta.json"
    if not path.is_file():
        raise ExportError(f"{str(path)!r} not found: the run has not finished or saved no client adapters")
    meta = json.loads(path.read_text())
    if meta.get("task", "classification") != "classification":
        # The PEFT export rebuilds a sequence classifier with its shared head; causal LMs are not wired up yet.
        raise ExportError(
            f"{str(run_dir)!r} is a {meta['task']} run; export writes classification adapters only. The clients' "
            "LoRA tensors are in clients/client_NNN.safetensors (keys '<module>.<expert>.lora_A/lora_B')."
        )
    return meta


def client_path(run_dir: str | Path, client: int) -> Path:
    """``clients/client_NNN.safetensors``; ExportError when the run has no such client."""
    path = Path(run_dir) / "clients" / f"client_{client:03d}.safetensors"
    if not path.is_file():
        found = sorted((Path(run_dir) / "clients").glob("client_*.safetensors"))
        raise ExportError(f"the run holds no client {client} (it saved {len(found)} clients, numbered from 0)")
    return path


def load_client_state(run_dir: str | Path, client: int) -> dict[str, torch.Tensor]:
    """Client ``client``'s final adapter state (keys as in :class:`fedtreelora.adapters.AdapterBank`)."""
    return load_file(str(client_path(run_dir, client)))


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """``config.yaml`` of the run as a plain dict ({} when absent)."""
    path = Path(run_dir) / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` (one per client per round it took part in); [] when absent."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def client_phase(run_dir: str | Path, meta: Mapping[str, Any], client: int) -> dict[str, Any]:
    """How client ``client``'s saved experts mix in the model it was last evaluated as.

    Starts from the run's final phase (``meta["final_phase"]``) and corrects it where that is not what
    the client was evaluated with:

    - a method that evaluates with its own mixer (FedDPA with ``inference: instance`` weighs its
      adapters per example): ``mixer`` becomes that mixer (``meta["final_phase"]["inference_mixer"]``
      when the run recorded it, else the method's ``inference`` option in config.yaml);
    - a client whose last round was a warm-up round (it missed every later round): warm-up phases
      train and evaluate expert 0 alone, so ``mixer`` becomes ``single``.

    Returns:
        a dict with ``name``, ``mixer``, ``experts``, ``fixed_weights`` and ``residual`` (experts at
        weight 1 outside the mixer; absent in runs that had none).
    """
    phase = dict(meta["final_phase"])
    method = str(meta.get("method"))
    inference = phase.get("inference_mixer") or (read_config(run_dir).get(method) or {}).get("inference")
    if inference in MIXERS and inference != phase["mixer"]:
        phase["mixer"] = inference
    rows = [r for r in read_metrics(run_dir) if int(r["client"]) == client]
    if rows and phase.get("name") != "warmup":
        last = max(rows, key=lambda r: int(r["round"]))
        if last.get("phase") == "warmup":
            phase.update(name="warmup", mixer="single", residual=[])  # warm-up uses no residual expert
    return phase


def expert_weights(
    phase: Mapping[str, Any], state: Mapping[str, torch.Tensor], site: str, method: str = "this"
) -> list[float]:
    """The constant weight of every expert at one site.

    Args:
        phase: the client's phase (see :func:`client_phase`): ``mixer``, ``experts``, ``fixed_weights``.
        state: the client's adapter state.
        site: module name of the site.
        method: the run's method, for the error message.
    Returns:
        one weight per mixed expert, in the order of ``phase["experts"]``: ``[1]`` (expert 0 alone) for
        ``single``, ``[1, 0, ...]`` in the phase's ``single_layers`` (FedTreeLoRA's layers shared by
        everyone), ``[lambda, 1 - lambda, ...]`` for ``lambda``, the fixed weights for ``fixed``; residual
        experts (``phase["residual"]``, last) get 1.
    Raises:
        ExportError for a mixer whose weights depend on the input (``router``, ``instance``).
    """
    residual = list(phase.get("residual") or ())
    mixed = [e for e in phase["experts"] if e not in residual]
    weights = _mixed_weights(phase, mixed, state, site, method)
    if residual:  # residual experts come last and act at weight 1 whatever the mixer
        weights = weights + [0.0] * (len(mixed) - len(weights)) + [1.0] * len(residual)
    return weights


def _mixed_weights(
    phase: Mapping[str, Any], experts: list[str], state: Mapping[str, torch.Tensor], site: str, method: str
) -> list[float]:
    """Weights of the mixed (non-residual) experts; ``[1.0]`` alone for expert 0 under ``single``."""
    mixer = phase["mixer"]
    if mixer == "single":
        return [1.0]
    if layer_index(site) in set(phase.get("single_layers") or ()):  # a layer every client shares: expert 0 alone
        return [1.0] + [0.0] * (len(experts) - 1)
    if mixer == "lambda":
        lam = float(torch.sigmoid(state[f"{site}.mix_logit"].float()))
        return [lam] + [1.0 - lam] * (len(experts) - 1)
    if mixer == "fixed":
        weights = phase.get("fixed_weights")
        if weights is None or len(weights) != len(experts):
            raise ExportError("the run's fixed mixer recorded no weight per expert")
        return [float(w) for w in weights]
    how = "a learned per-token softmax router" if mixer == "router" else "weights computed for each example"
    raise ExportError(
        f"the {method} run mixes its experts with the {mixer!r} mixer ({how}); that is not one LoRA, so it "
        f"cannot be exported as a PEFT LoRA adapter. Exportable mixers: {', '.join(EXPORTABLE_MIXERS)}"
    )


def merged_factors(
    phase: Mapping[str, Any], state: Mapping[str, torch.Tensor], site: str, method: str = "this"
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA equal to the weighted mix of a site's experts.

    Returns:
        (A, B) with A (E * r, d_in) the experts' A stacked, B (d_out, E * r) the experts' B, each
        multiplied by its weight, side by side; so ``B @ A = sum_e w_e B_e A_e``.
    """
    weights = expert_weights(phase, state, site, method)
    used = list(phase["experts"])[: len(weights)]
    a = torch.cat([state[f"{site}.{e}.lora_A"].float() for e in used], dim=0)
    b = torch.cat([w * state[f"{site}.{e}.lora_B"].float() for e, w in zip(used, weights, strict=True)], dim=1)
    return a, b


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
        lora_alpha=float(model_cfg["alpha"]) * rank / int(model_cfg["rank"]),
        lora_dropout=float(model_cfg.get("dropout", 0.0)),
        target_modules=list(model_cfg["target_modules"]),
        layers_to_transform=None if layers is None else [int(x) for x in layers],
        modules_to_save=heads if include_head and heads else None,
        bias="none",
    )
    with warnings.catch_warnings():  # transformers' deprecation notices from inside peft
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(base, config)
    inner = model.base_model.model
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
            module = inner.get_submodule(name)
            module.lora_A["default"].weight.copy_(a)
            module.lora_B["default"].weight.copy_(b)
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


def export_client(run_dir: str | Path, client: int, out_dir: str | Path) -> Path:
    """Write client ``client``'s personalized model as a PEFT LoRA adapter in ``out_dir``.

    The client's final experts are merged per site into one LoRA of rank E * r (E experts of the
    final phase: 2r for FedTreeLoRA, r for single-expert methods), see the module docstring; the head
    (shared or the client's own) is saved through ``modules_to_save``.

    Args:
        run_dir: a finished run folder (``clients/meta.json`` and ``clients/client_NNN.safetensors``).
        client: client index, from 0.
        out_dir: adapter folder to write (created).
    Returns:
        ``out_dir``.
    Raises:
        ExportError when the run's mixer is not a constant mix (``router``, ``instance``) or the client
        does not exist.
    """
    run = Path(run_dir)
    meta = read_meta(run)
    state = load_client_state(run, client)
    method = str(meta.get("method"))
    phase = client_phase(run, meta, client)
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
    """Layers (0-based) where every client is in one cluster, from ``summary.json``'s labels (a client
    marked -1, never placed in a cluster, is left out)."""
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    labels = summary.get("labels")
    if labels is None:
        raise ExportError(f"the {summary.get('method')} run recorded no per-layer clusters, so it has no trunk")
    return [layer for layer, row in enumerate(labels) if len({v for v in row if v >= 0}) == 1]


def last_round_clients(run_dir: str | Path, num_clients: int) -> list[int]:
    """Clients whose update the server accepted in the run's last round (all when metrics are absent)."""
    rows = read_metrics(run_dir)
    if not rows:
        return list(range(num_clients))
    last = max(int(r["round"]) for r in rows)
    return sorted({int(r["client"]) for r in rows if int(r["round"]) == last})


def export_trunk(run_dir: str | Path, out_dir: str | Path, *, expert: str | None = None) -> Path:
    """Write the federation's shared trunk as a PEFT LoRA adapter (rank r) restricted to its layers.

    The trunk is every layer where all clients are in one cluster (``summary.json`` labels). There all
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
        expert: the shared expert's name; by default :data:`SHARED_EXPERT` of the run's method.
    Returns:
        ``out_dir``.
    Raises:
        ExportError when no layer is shared by all clients, the run ended during warm-up (nothing shared
        yet), or the method shares no whole expert.
    """
    run = Path(run_dir)
    meta = read_meta(run)
    method = str(meta.get("method"))
    if expert is None:
        if method not in SHARED_EXPERT:
            raise ExportError(
                f"the {method} method shares no whole expert across all clients that export_trunk knows of "
                f"(it knows {sorted(SHARED_EXPERT)}); pass expert= to name one"
            )
        expert = SHARED_EXPERT[method]
    if meta["final_phase"].get("name") == "warmup":
        raise ExportError("the run ended during warm-up: the clients have shared nothing yet, so there is no trunk")
    layers = trunk_layers(run)
    if not layers:
        raise ExportError(
            "no layer is shared by all clients (every layer has two or more clusters), so there is no trunk"
        )
    num_clients = len(list((run / "clients").glob("client_*.safetensors")))
    clients = last_round_clients(run, num_clients)
    states = [load_client_state(run, k) for k in clients]
    weights = np.ones(len(states))
    if (read_config(run).get(method) or {}).get("weighting") == "examples":
        partition = json.loads((run / "partition.json").read_text())
        counts = [sum(c["train_label_counts"]) for c in partition["clients"]]
        weights = np.asarray([counts[k] for k in clients], dtype=np.float64)
    w = torch.as_tensor(weights / weights.sum(), dtype=torch.float32)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for site in meta["sites"]:
        if site["layer"] not in layers:
            continue
        name = site["name"]
        a = torch.einsum("k,kij->ij", w, torch.stack([s[f"{name}.{expert}.lora_A"].float() for s in states]))
        b = torch.einsum("k,kij->ij", w, torch.stack([s[f"{name}.{expert}.lora_B"].float() for s in states]))
        factors[name] = (a, b)
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
