"""FedLEASE's adaptive top-M router (the ``topm`` mixer): weights against hand computation and against
the authors' per-token algorithm, empty expert slots, the own expert, slot independence, what trains,
and one federated round on a real model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedtreelora.adapters import AdapterBank, ExpertSpec, MultiClientLoraLinear, PhaseSpec
from fedtreelora.config import load_config
from fedtreelora.engines import build_federation
from fedtreelora.train import run_client_round

E = 4  # expert slots (max_clusters)


def topm_layer(num_slots: int = 1, d_in: int = 5, d_out: int = 3, seed: int = 0) -> MultiClientLoraLinear:
    """A layer with E random experts and a random top-M router in every slot."""
    torch.manual_seed(seed)
    layer = MultiClientLoraLinear(nn.Linear(d_in, d_out), num_slots=num_slots, num_experts=E, rank=2, alpha=4.0)
    with torch.no_grad():
        for p in [*layer.lora_A, *layer.lora_B, layer.topm_router]:
            p.copy_(torch.randn(p.shape))
    layer.set_mixer("topm")
    return layer


def authors_weights(router: torch.Tensor, x: torch.Tensor, m: int) -> torch.Tensor:
    """The authors' routing for one client with M = m experts, token by token (their ``Linear.forward`` in
    peft/tuners/lora.py): logits over 2M - 1 outputs, softmax, top M, divide by their sum, outputs M..2M-2
    count for the own expert. Experts are numbered as in our slots (own = 0), the M - 1 extra outputs are
    our rows E .. E + m - 2.

    Args:
        router: (2E - 1, d_in); x: (n, d_in). Returns: (n, E) weights (zero beyond the m experts).
    """
    rows = torch.cat([router[:m], router[E : E + m - 1]])  # (2m - 1, d_in)
    mapping = [*range(m), *([0] * (m - 1))]
    out = torch.zeros(x.shape[0], E)
    for t in range(x.shape[0]):
        probs = torch.softmax(x[t] @ rows.T, dim=-1)
        top = probs.topk(m)
        for w, i in zip((top.values / top.values.sum()).tolist(), top.indices.tolist(), strict=True):
            out[t, mapping[i]] += w
    return out


def test_topm_weights_equal_hand_computed_ones() -> None:
    layer = MultiClientLoraLinear(nn.Linear(2, 2), num_slots=1, num_experts=E, rank=1, alpha=1.0)
    layer.set_mixer("topm")
    with torch.no_grad():
        # rows 0..3 score experts 0..3, rows 4..6 are the extra outputs of expert 0 (the own expert);
        # token 1 = (1, 0) reads column 0, token 2 = (0, 1) column 1
        layer.topm_router[0, :, 0] = torch.tensor([0.0, 1.0, 2.0, 3.0, 0.5, 1.5, 4.0])
        layer.topm_router[0, :, 1] = torch.tensor([5.0, 0.2, 0.1, 1.0, 0.3, 0.4, 9.0])
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (slots, tokens, d_in)
    exp = math.exp

    # M = 3 (slot 3 empty): the 2M - 1 = 5 outputs are rows 0, 1, 2 and the extras 4, 5; keep the top 3
    layer.expert_mask.copy_(torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    w = layer.topm_weights(x)[0]
    # token 1: logits (0, 1, 2 | 0.5, 1.5): rows 2, 5 (own) and 1
    z = exp(2.0) + exp(1.5) + exp(1.0)
    torch.testing.assert_close(w[0], torch.tensor([exp(1.5), exp(1.0), exp(2.0), 0.0]) / z)
    # token 2: logits (5, 0.2, 0.1 | 0.3, 0.4): rows 0, 5 and 4, all the own expert: one expert used
    torch.testing.assert_close(w[1], torch.tensor([1.0, 0.0, 0.0, 0.0]))

    # M = 4: all 7 outputs; keep the top 4
    layer.expert_mask.fill_(1.0)
    w = layer.topm_weights(x)[0]
    # token 1: rows 6 (4, own), 3 (3), 2 (2), 5 (1.5, own)
    z = exp(4.0) + exp(3.0) + exp(2.0) + exp(1.5)
    torch.testing.assert_close(w[0], torch.tensor([exp(4.0) + exp(1.5), 0.0, exp(2.0), exp(3.0)]) / z)
    # token 2: rows 6 (9, own), 0 (5, own), 3 (1), 5 (0.4, own)
    z = exp(9.0) + exp(5.0) + exp(1.0) + exp(0.4)
    torch.testing.assert_close(w[1], torch.tensor([exp(9.0) + exp(5.0) + exp(0.4), 0.0, 0.0, exp(1.0)]) / z)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_topm_weights_follow_the_authors_algorithm_and_leave_empty_slots_at_zero(m: int) -> None:
    layer = topm_layer(num_slots=1)
    layer.expert_mask.copy_((torch.arange(E) < m).float()[None])
    x = torch.randn(1, 50, 5)
    w = layer.topm_weights(x)[0]
    torch.testing.assert_close(w, authors_weights(layer.topm_router[0].detach(), x[0], m))
    assert (w[:, m:] == 0).all(), "an expert that does not exist gets exactly zero weight"
    assert (w[:, 0] > 0).all(), "the own expert is always selected"
    used = (w > 0).sum(dim=-1)
    assert used.min() >= 1 and used.max() <= m
    torch.testing.assert_close(w.sum(dim=-1), torch.ones(50))


def test_empty_slots_add_nothing_to_the_output() -> None:
    layer = topm_layer(num_slots=1)
    layer.expert_mask.copy_(torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    x = torch.randn(2, 7, 5)
    before = layer(x)
    with torch.no_grad():
        for e in (2, 3):  # a zero B is legitimately zero; the mask alone says the slot is empty
            layer.lora_A[e].mul_(100.0)
            layer.lora_B[e].mul_(-100.0)
    torch.testing.assert_close(layer(x), before)


def test_own_expert_alone_when_the_extra_outputs_win_and_with_one_expert() -> None:
    layer = topm_layer(num_slots=1)
    with torch.no_grad():
        layer.topm_router.zero_()
        layer.topm_router[0, E:, 0] = 10.0  # every extra output (own expert) dominates when x[0] > 0
    x = torch.zeros(1, 3, 5)
    x[..., 0] = 1.0
    w = layer.topm_weights(x)[0]
    # M = 4 takes the 3 extras and the best real row: the own expert (row 0 ties with rows 1-3 at 0)
    assert (w[:, 0] >= 30.0 / 31.0).all() and (w.sum(dim=-1) - 1).abs().max() < 1e-6
    # M = 1: one output, weight 1 on the own expert, which is the single mixer
    layer.expert_mask.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    x = torch.randn(2, 4, 5)
    torch.testing.assert_close(layer.topm_weights(x.reshape(1, 8, 5))[0], torch.eye(E)[0].expand(8, E))
    topm = layer(x)
    layer.set_mixer("single")
    torch.testing.assert_close(topm, layer(x))


def test_expert_zero_counts_as_present_whatever_its_mask_column_says() -> None:
    layer = topm_layer(num_slots=1)
    x = torch.randn(1, 6, 5)
    layer.expert_mask.copy_(torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    expected = layer.topm_weights(x)
    layer.expert_mask.copy_(torch.tensor([[0.0, 1.0, 1.0, 0.0]]))
    torch.testing.assert_close(layer.topm_weights(x), expected)


def test_slots_compute_independently() -> None:
    together = topm_layer(num_slots=3, seed=1)
    masks = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    together.expert_mask.copy_(masks)
    together.active_slots = 3
    x = torch.randn(3 * 2, 7, 5)  # 2 rows per slot
    out = together(x)
    for k in range(3):
        alone = MultiClientLoraLinear(together.base, num_slots=1, num_experts=E, rank=2, alpha=4.0)
        with torch.no_grad():
            for e in range(E):
                alone.lora_A[e].copy_(together.lora_A[e][k : k + 1])
                alone.lora_B[e].copy_(together.lora_B[e][k : k + 1])
            alone.topm_router.copy_(together.topm_router[k : k + 1])
            alone.expert_mask.copy_(masks[k : k + 1])
        alone.set_mixer("topm")
        torch.testing.assert_close(out[2 * k : 2 * k + 2], alone(x[2 * k : 2 * k + 2]))


def test_only_the_used_router_rows_and_the_own_expert_train() -> None:
    layer = topm_layer(num_slots=2)
    layer.expert_mask.copy_(torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]]))
    layer.active_slots = 2
    for e in range(1, E):
        layer.lora_A[e].requires_grad_(False)
        layer.lora_B[e].requires_grad_(False)
    layer(torch.randn(2 * 3, 9, 5)).square().sum().backward()
    grad = layer.topm_router.grad
    # slot 0 (M = 2): rows 0, 1 and one extra (row 4); slot 1 (M = 3): rows 0-2 and extras 4, 5
    for k, used in ((0, [0, 1, 4]), (1, [0, 1, 2, 4, 5])):
        for row in range(2 * E - 1):
            assert (grad[k, row].abs().sum() > 0) == (row in used), (k, row)
    assert layer.router.grad is None and layer.mix_logit.grad is None
    assert layer.lora_A[0].grad.abs().sum() > 0 and layer.lora_B[0].grad.abs().sum() > 0


# --- a real model ---------------------------------------------------------------------------------


def test_bank_trains_the_topm_router_only_under_the_topm_mixer(one_thread: None) -> None:
    from fedtreelora.models import load_classifier

    model = load_classifier("minilm", 2, num_layers=1, seed=0).model
    bank = AdapterBank(model, target_modules=["query"], expert_names=("own", "other_1"), rank=2, alpha=4.0, dropout=0)
    layer = next(iter(bank.layers.values()))
    assert bank.state_shapes()[f"{bank.sites[0].name}.topm_router"] == (3, bank.sites[0].d_in)
    assert bank.state_shapes()[f"{bank.sites[0].name}.expert_mask"] == (2,)
    assert any(p is layer.topm_router for p in bank.mixer_parameters()), "the router trains at the mixer rate"
    experts = (ExpertSpec("own"), ExpertSpec("other_1", False, False))
    for mixer, train_mixer in (("topm", True), ("topm", False), ("router", True)):
        trainable = bank.configure(PhaseSpec(experts, mixer=mixer, train_mixer=train_mixer))
        assert any(p is layer.topm_router for p in trainable) == (mixer == "topm" and train_mixer)
        assert not layer.expert_mask.requires_grad


@pytest.mark.slow
def test_a_federated_round_trains_the_router_and_the_own_expert_only(one_thread: None) -> None:
    config = load_config(
        overrides=[
            "method=fedlease",
            "fedlease.warmup_rounds=1",
            "fedlease.max_clusters=3",
            "model.num_layers=2",
            "data.num_clients=4",
            "data.n_train=12",
            "data.n_val=6",
            "train.batch_size=4",
            "train.local_steps=3",
        ]
    )
    fed = build_federation(config)
    strategy, bank = fed.strategy, fed.bank
    routers = [f"{s.name}.topm_router" for s in bank.sites]
    masks = [f"{s.name}.expert_mask" for s in bank.sites]

    def client_round(rnd: int, client: int, state: dict[str, torch.Tensor]):  # type: ignore[no-untyped-def]
        return run_client_round(
            bank,
            fed.classifier.tokenizer,
            state=state,
            payload=strategy.payload(rnd, client),
            upload_keys=list(strategy.upload_keys(rnd, client)),
            train_data=fed.train_data[client],
            val_data=fed.val_data[client],
            seed=rnd * 100 + client,
            phase=strategy.phase(rnd),
            settings=fed.settings,
            device=fed.device,
        )

    warm = {c: client_round(0, c, dict(fed.initial_state)) for c in range(4)}
    assert all(not (set(routers) & set(r.upload)) for r in warm.values()), "no router goes up in warm-up"
    assert all(torch.equal(warm[c].state[k], fed.initial_state[k]) for c in warm for k in routers)
    strategy.aggregate(0, {c: r.upload for c, r in warm.items()})
    m = strategy.num_clusters
    assert m in (2, 3), "four clients: the silhouette search tries 2 and 3 clusters"
    assert strategy.phase(1).mixer == "topm"

    sent = strategy.payload(1, 0)
    assert all(sent[k].tolist() == [1.0] * m + [0.0] * (3 - m) for k in masks)
    result = client_round(1, 0, warm[0].state)
    after = result.state
    assert math.isfinite(result.metrics["train_loss"]) and result.metrics["steps"] == 3
    for k in routers:
        moved = (after[k] - warm[0].state[k]).abs().sum(dim=-1)  # (2 * 3 - 1,) per router row
        used = [*range(m), *range(3, 3 + m - 1)]
        assert all((moved[row] > 0) == (row in used) for row in range(5)), (m, moved)  # unused rows stay put
        torch.testing.assert_close(result.upload[k], after[k])
    for key, value in sent.items():
        if ".other_" in key:  # the other clusters' experts are frozen
            assert torch.equal(after[key], value), key
    assert any(not torch.equal(after[k], sent[k]) for k in strategy.expert_keys("own")), "the own expert trains"

    # every client trains once more; the server sends each cluster the mean of its members' routers
    uploads = {c: client_round(1, c, warm[c].state).upload for c in range(4)}
    strategy.aggregate(1, uploads)
    members = [c for c in range(4) if strategy.labels[c] == strategy.labels[0]]
    for k in routers:
        mean = torch.stack([uploads[c][k] for c in members]).double().mean(dim=0).float()
        torch.testing.assert_close(strategy.payload(2, 0)[k], mean)
