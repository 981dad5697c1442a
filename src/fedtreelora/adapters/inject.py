"""Put :class:`MultiClientLoraLinear` on the target modules of any transformers model, and move one
client's adapter tensors in and out of a slot."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from fedtreelora.adapters.layer import MultiClientLoraLinear
from fedtreelora.adapters.spec import PhaseSpec
from fedtreelora.errors import ConfigError

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


@dataclass(frozen=True)
class Site:
    """One adapted projection.

    Attributes:
        name: full module name in the model, e.g. ``bert.encoder.layer.3.attention.self.query``.
        layer: transformer block index (0 nearest the input).
        module: the target name it matched, e.g. ``query``.
        d_in, d_out: the wrapped linear's input and output sizes.
    """

    name: str
    layer: int
    module: str
    d_in: int
    d_out: int


def layer_index(module_name: str) -> int:
    """The block index in a module path: the first purely numeric component."""
    match = _LAYER_INDEX.search(module_name)
    if match is None:
        raise ValueError(f"cannot tell which layer module {module_name!r} belongs to (no numeric path component)")
    return int(match.group(1))


def find_target_modules(model: nn.Module, target_modules: Sequence[str]) -> list[tuple[str, str]]:
    """``(module name, matched target)`` for every ``nn.Linear`` that peft would adapt for these targets.

    Raises ValueError listing the model's linear module names when a target matches nothing.
    """
    config = LoraConfig(target_modules=list(target_modules))
    found: list[tuple[str, str]] = []
    matched: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not check_target_module_exists(config, name):
            continue
        target = next((t for t in target_modules if name == t or name.endswith(f".{t}")), name.rsplit(".", 1)[-1])
        found.append((name, target))
        matched.add(target)
    missing = [t for t in target_modules if t not in matched]
    if missing:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(
            f"model.target_modules {missing} match no linear layer of this model; its linear layers are "
            f"named {suffixes}"
        )
    return found


class AdapterBank:
    """The adapted model plus the bookkeeping to swap clients' adapters in and out of slots.

    A client's state is a flat dict of CPU tensors without the slot axis; keys are
    ``"{site}.{expert}.lora_A"`` (rank, d_in), ``"{site}.{expert}.lora_B"`` (d_out, rank),
    ``"{site}.mix_logit"`` (), ``"{site}.router"`` (experts, d_in), ``"{site}.topm_router"``
    (2 * experts - 1, d_in) and ``"{site}.expert_mask"`` (experts,) (which experts exist for the
    ``topm`` mixer; not trainable).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        target_modules: Sequence[str],
        expert_names: Sequence[str],
        rank: int,
        alpha: float,
        dropout: float,
        num_slots: int = 1,
        lambda_init: float = 0.5,
        local_modules: Sequence[str] = (),
    ) -> None:
        self.model = model
        self.num_slots = num_slots
        self.expert_names = tuple(expert_names)
        self.rank = rank
        for p in model.parameters():
            p.requires_grad_(False)
        self.sites: list[Site] = []
        self.layers: dict[str, MultiClientLoraLinear] = {}
        for name, target in find_target_modules(model, target_modules):
            base = model.get_submodule(name)
            wrapped = MultiClientLoraLinear(
                base,
                num_slots=num_slots,
                num_experts=len(self.expert_names),
                rank=rank,
                alpha=alpha,
                dropout=dropout,
                lambda_init=lambda_init,
            )
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapped)
            self.layers[name] = wrapped
            self.sites.append(Site(name, layer_index(name), target, wrapped.in_features, wrapped.out_features))
        self.sites.sort(key=lambda s: (s.layer, target_modules.index(s.module), s.name))
        self.num_layers = max(s.layer for s in self.sites) + 1
        # Whole modules (e.g. a classification head) that each client trains and keeps for itself.
        # They have no slot axis, so they are swapped in place and need num_slots == 1.
        self.local_parameters: dict[str, nn.Parameter] = {}
        for module_name in local_modules:
            if num_slots != 1:
                raise ValueError("local (per-client) whole modules need num_slots == 1")
            for pname, p in model.get_submodule(module_name).named_parameters():
                self.local_parameters[f"{module_name}.{pname}"] = p
        self.module_names = tuple(
            dict.fromkeys(s.module for s in sorted(self.sites, key=lambda s: target_modules.index(s.module)))
        )

    # --- keys -------------------------------------------------------------------------------------
    def expert_keys(self, expert: str) -> list[str]:
        """All state keys of one expert, site by site (A then B)."""
        return [f"{s.name}.{expert}.{f}" for s in self.sites for f in ("lora_A", "lora_B")]

    def _tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for site in self.sites:
            layer = self.layers[site.name]
            for e, expert in enumerate(self.expert_names):
                yield f"{site.name}.{expert}.lora_A", layer.lora_A[e]
                yield f"{site.name}.{expert}.lora_B", layer.lora_B[e]
            yield f"{site.name}.mix_logit", layer.mix_logit
            yield f"{site.name}.router", layer.router
            yield f"{site.name}.topm_router", layer.topm_router
            yield f"{site.name}.expert_mask", layer.expert_mask

    def _items(self) -> Iterator[tuple[str, torch.Tensor, bool]]:
        """(key, tensor, has slot axis) for everything a client's state holds."""
        for key, p in self._tensors():
            yield key, p, True
        for key, p in self.local_parameters.items():
            yield key, p, False

    # --- slots ------------------------------------------------------------------------------------
    def read_slot(self, slot: int) -> dict[str, torch.Tensor]:
        """A copy of slot ``slot``'s tensors on CPU, float32."""
        return {
            key: (p.detach()[slot] if slotted else p.detach()).to("cpu", torch.float32).clone()
            for key, p, slotted in self._items()
        }

    def write_slot(self, slot: int, state: Mapping[str, torch.Tensor]) -> None:
        """Copy tensors into slot ``slot``; keys absent from ``state`` keep their values.

        Raises KeyError for a key the model does not hold, ValueError for a shape that differs.
        """
        params = {key: (p, slotted) for key, p, slotted in self._items()}
        with torch.no_grad():
            for key, value in state.items():
                if key not in params:
                    raise KeyError(f"adapter state key {key!r} is not held by this model")
                param, slotted = params[key]
                target = param[slot] if slotted else param
                if tuple(value.shape) != tuple(target.shape):
                    raise ValueError(
                        f"adapter tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(target.shape)}"
                    )
                target.copy_(value.to(target.device, target.dtype))

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-client shape of every state key."""
        return {key: tuple(p.shape[1:] if slotted else p.shape) for key, p, slotted in self._items()}

    # --- behaviour --------------------------------------------------------------------------------
    def configure(self, phase: PhaseSpec, active_slots: int = 1) -> list[nn.Parameter]:
        """Set mixer, fixed weights and trainability for a phase; return the trainable parameters."""
        if phase.expert_names != self.expert_names[: len(phase.experts)]:
            raise ValueError(f"phase experts {phase.expert_names} do not match the model's {self.expert_names}")
        trainable: list[nn.Parameter] = []
        layer_of = {s.name: s.layer for s in self.sites}
        for name, layer in self.layers.items():
            mixer = phase.mixer_at(layer_of[name])
            residual = phase.residual_experts
            if residual and len(phase.experts) < len(self.expert_names):
                raise ValueError("a phase with residual experts must list every expert of the model")
            layer.set_mixer(mixer, residual)
            layer.active_slots = active_slots
            if phase.fixed_weights is not None:
                layer.fixed_weights.copy_(torch.tensor(phase.fixed_weights, dtype=torch.float32))
            for e in range(len(self.expert_names)):
                spec = phase.experts[e] if e < len(phase.experts) else None
                layer.lora_A[e].requires_grad_(bool(spec and spec.train_a))
                layer.lora_B[e].requires_grad_(bool(spec and spec.train_b))
            layer.mix_logit.requires_grad_(phase.train_mixer and mixer == "lambda")
            layer.router.requires_grad_(phase.train_mixer and mixer == "router")
            layer.topm_router.requires_grad_(phase.train_mixer and layer.mixer == "topm")
            trainable.extend(p for p in layer.parameters() if p.requires_grad)
        for p in self.local_parameters.values():
            p.requires_grad_(True)
            trainable.append(p)
        return trainable

    def trainable_per_client(self) -> int:
        """Parameters one client trains under the current configuration (one slot's share)."""
        return sum((p[0].numel() if slotted else p.numel()) for _, p, slotted in self._items() if p.requires_grad)

    def mixer_parameters(self) -> list[nn.Parameter]:
        """The lambda logits and routers of every layer (they may use their own learning rate)."""
        return [p for layer in self.layers.values() for p in (layer.mix_logit, layer.router, layer.topm_router)]
