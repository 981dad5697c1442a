"""What crosses the wire: the ServerApp's engine and the real ClientApp, joined by a loopback Grid
that records every message both ways."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
from flower_helpers import in_process, metrics_by_client_round, small_experiment
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedtreelora.engines.flower import client_app
from fedtreelora.engines.flower.server import FlowerEngine
from fedtreelora.engines.flower.settings import FlowerRunSettings
from fedtreelora.engines.setup import load_partitioned_data
from fedtreelora.runfolder import RunFolder

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def task_identity():
    """The process identity Flower's runtime sets before a ServerApp runs (messages carry it)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class LoopbackGrid(Grid):
    """Delivers each message to the ClientApp of its node in this process, as a SuperNode would;
    ``silent`` nodes never answer (a node that went away)."""

    def __init__(self, settings: FlowerRunSettings, num_nodes: int, node_configs: list[dict] | None = None) -> None:
        """Simulation-style nodes (``partition-id``), or deployment-style ones from ``node_configs``."""
        run_config = settings.to_run_config()
        configs = node_configs or [{"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)]
        self.contexts = {1000 + i: Context(1, 1000 + i, c, RecordDict(), run_config) for i, c in enumerate(configs)}
        self.sent: list[Message] = []
        self.received: list[Message] = []
        self.silent: set[int] = set()

    def set_run(self, run):  # type: ignore[no-untyped-def]
        self._run = run

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        raise NotImplementedError("send_and_receive delivers directly")

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        raise NotImplementedError("send_and_receive delivers directly")

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        replies = []
        for message in messages:
            self.sent.append(message)
            node = message.metadata.dst_node_id
            if node in self.silent:
                continue
            reply = client_app.app(message, self.contexts[node])
            self.received.append(reply)
            replies.append(reply)
        return replies


def _records(message: Message) -> list[tuple[str, object]]:
    return list(message.content.items())


def test_only_adapter_tensors_and_scalars_cross_the_wire(tmp_path):
    config = small_experiment("fedtreelora", rounds=2)
    settings = FlowerRunSettings.for_experiment(config)
    grid = LoopbackGrid(settings, num_nodes=3)
    FlowerEngine(config, grid, tmp_path / "run", quiet=True, report=False).run()

    dataset, clients = load_partitioned_data(config)
    texts = {t for split in (dataset.train, dataset.validation) for t in split.texts}
    words = {w for t in list(texts)[:2000] for w in t.split() if len(w) > 6}
    assert grid.sent and grid.received
    for message in grid.sent + grid.received:
        for name, record in _records(message):
            assert isinstance(record, (ArrayRecord, ConfigRecord, MetricRecord)), (name, type(record))
            if isinstance(record, ArrayRecord):
                for key in record:
                    # adapter state keys only: "<site>.<expert>.lora_A|lora_B" or a mixer's parameters
                    assert key.endswith(
                        (".lora_A", ".lora_B", ".mix_logit", ".router", ".topm_router", ".expert_mask")
                    ), key
                    assert np.issubdtype(record[key].numpy().dtype, np.floating), key
            else:
                for key, value in record.items():
                    values = value if isinstance(value, list) else [value]
                    for v in values:
                        assert not isinstance(v, bytes), key
                        if isinstance(v, str):
                            # strings are keys, phase names and the label vocabulary, never example text
                            assert v not in texts and not (set(v.split()) & words), (key, v)
    # Nothing but per-client counts: the info replies carry as many numbers as labels, not examples.
    info = [m.content["info"] for m in grid.received if "info" in m.content and "num-train" in m.content["info"]]
    assert len(info) == 3
    assert all(len(i["train-label-counts"]) == dataset.num_labels for i in info)


@pytest.mark.parametrize(
    "method, options",
    [("fedit", {}), ("fedtreelora", {"fedtreelora": {"warmup_rounds": 1, "tau": -1.0}}), ("feddpa", {})],
)
def test_loopback_run_matches_in_process_and_a_silent_node_keeps_its_state(tmp_path, method, options):
    """Trained and received scores, round by round, as the in-process engine gives them (FedTreeLoRA:
    the nodes learn the shared layers from the server; FedDPA: its own instance-wise evaluation)."""
    config = small_experiment(method, rounds=3, **options)
    expected = metrics_by_client_round(_run_in_process(config, tmp_path))
    settings = FlowerRunSettings.for_experiment(config)
    grid = LoopbackGrid(settings, num_nodes=3)

    class GoesSilent(FlowerEngine):
        def _round(self, fed, runner, rnd, run, tick):  # type: ignore[no-untyped-def]
            if rnd == 2:
                grid.silent.add(fed.nodes[2])  # client 2's node stops answering in the last round
            return super()._round(fed, runner, rnd, run, tick)

    summary = GoesSilent(config, grid, tmp_path / "run", quiet=True, report=False).run()
    got = metrics_by_client_round(tmp_path / "run")
    assert summary["history"][2]["clients"] == [0, 1]
    assert set(got) == set(expected) - {(2, 2)}
    for key, record in got.items():
        # The last round's aggregate lacks client 2 here, so what the others receive then differs.
        received = ("received_accuracy", "received_eval_loss") if key[0] < 2 else ()
        for field in ("accuracy", "eval_loss", *received):
            assert record[field] == pytest.approx(expected[key][field], abs=1e-6), (key, field)
    # client 2 keeps its last score (round 2) and its node was not asked for a final state
    assert summary["per_client"][2] == pytest.approx(expected[(1, 2)]["received_accuracy"], abs=1e-6)
    assert [m.metadata.message_type for m in grid.sent].count("evaluate") == 3 + 3 + 2, "one per accepted client"
    assert not (tmp_path / "run" / "clients" / "client_002.safetensors").exists()
    assert (tmp_path / "run" / "clients" / "client_000.safetensors").exists()
    # the received models: of the clients whose final state came back, theirs plus the server's last payload
    folder = RunFolder(tmp_path / "run")
    assert folder.saved_clients("received") == [0, 1]
    shared = {"fedit": (".shared.",), "fedtreelora": (".cluster.", ".external."), "feddpa": (".global.",)}[method]
    kept, received = folder.client_state(0), folder.client_state(0, "received")
    assert received.keys() == kept.keys()
    assert all(received[k].equal(kept[k]) for k in kept if not any(s in k for s in shared))
    assert any(not received[k].equal(kept[k]) for k in kept if any(s in k for s in shared))


def _run_in_process(config, tmp_path):  # type: ignore[no-untyped-def]
    in_process(config, tmp_path / "in-process")
    return tmp_path / "in-process"


def test_generation_sites_read_their_own_files_and_match_in_process(tmp_path):
    """Deployment-style nodes holding instruction data: each site reads its own JSONL files (written
    by ``fedtreelora flower sites``) and the run gives the in-process engine's ROUGE, round by round."""
    from fedtreelora.engines.flower.sites import write_sites

    config = small_experiment(
        "fedit",
        rounds=2,
        num_clients=2,
        model={"name": "smollm2", "num_layers": 2, "max_length": 96},
        data={"dataset": "evals-nlg", "tasks": ["swap-words", "sarcasm"], "num_clients": 2, "n_train": 4, "n_val": 2},
        generation={"max_new_tokens": 6},
        train={"local_epochs": 1, "batch_size": 2, "eval_batch_size": 2},
    )
    expected = in_process(config, tmp_path / "in-process")
    sites = write_sites(config, tmp_path / "sites")
    assert sorted(p.name for p in sites[0].iterdir()) == ["train.jsonl", "validation.jsonl"]
    node_configs = [{"client-id": k, "data": str(site)} for k, site in enumerate(sites)]
    grid = LoopbackGrid(FlowerRunSettings.for_experiment(config), 2, node_configs)
    summary = FlowerEngine(config, grid, tmp_path / "run", quiet=True, report=False).run()

    assert summary["client_categories"] == expected["client_categories"] == ["Text Edit", "Sentiment"]
    a, b = metrics_by_client_round(tmp_path / "in-process"), metrics_by_client_round(tmp_path / "run")
    assert a.keys() == b.keys() and len(a) == 2 * 2
    for key in a:
        for field in ("rouge1", "train_loss", "eval_loss"):
            assert b[key][field] == pytest.approx(a[key][field], abs=1e-5), (key, field)
    info = [m.content["info"] for m in grid.received if "info" in m.content and "num-train" in m.content["info"]]
    assert [list(i["task-categories"]) for i in info] == [["Text Edit"], ["Sentiment"]]


def test_a_nodes_upload_transforms_shape_what_crosses_the_wire(tmp_path):
    """The ClientApp cuts its upload through its federation's upload chain, as the in-process engine does:
    a transform that zeroes one tensor on every node zeroes it in every upload the server receives."""
    from fedtreelora.engines.flower.node import node_client
    from fedtreelora.train import UploadContext

    config = small_experiment("fedit", rounds=2)
    settings = FlowerRunSettings.for_experiment(config)
    grid = LoopbackGrid(settings, num_nodes=3)
    node_experiment = FlowerRunSettings.from_run_config(settings.to_run_config()).experiment
    feds = [node_client(node_experiment, context.node_config).fed for context in grid.contexts.values()]
    zeroed = next(k for k in feds[0].strategy.upload_keys(0, 0) if k.endswith(".lora_B"))
    seen: list[tuple[int | None, int | None]] = []

    def zero(upload, context: UploadContext):  # type: ignore[no-untyped-def]
        seen.append((context.round, context.client))
        return {k: v.new_zeros(v.shape) if k == zeroed else v for k, v in upload.items()}

    received: dict[tuple[int, int], dict] = {}

    class Recording(FlowerEngine):
        def tamper(self, rnd, client, upload):  # type: ignore[no-untyped-def]
            received[(rnd, client)] = upload
            return upload

    for fed in feds:  # one federation per process, cached: put the chain back afterwards
        fed.upload_transforms = (zero,)
    try:
        Recording(config, grid, tmp_path / "run", quiet=True, report=False).run()
    finally:
        for fed in feds:
            fed.upload_transforms = ()
    assert sorted(seen) == sorted(received) == [(r, k) for r in range(2) for k in range(3)]
    for key, upload in received.items():
        assert not upload[zeroed].any(), key
        assert all(v.abs().max() > 0 for k, v in upload.items() if k != zeroed), key


def test_private_uploads_cross_the_wire_as_in_process(tmp_path):
    """With ``privacy`` on, every node clips and noises its upload through the chain its federation is built
    with: the server receives, warm-up included, bit for bit what the in-process engine's server receives,
    and both report the same epsilon."""
    from fedtreelora.engines import SimulationEngine
    from fedtreelora.privacy import GaussianUpdate

    config = small_experiment(
        "fedtreelora", rounds=2, fedtreelora={"warmup_rounds": 1, "tau": -1.0},
        train={"local_epochs": 1, "batch_size": 8, "clients_per_pass": 1},
        privacy={"clip_norm": 0.05, "noise_multiplier": 1.0, "delta": 1e-3},
    )  # fmt: skip
    received: dict[str, dict[tuple[int, int], dict]] = {"flower": {}, "in-process": {}}

    class InProcess(SimulationEngine):
        def tamper(self, rnd, client, upload):  # type: ignore[no-untyped-def]
            received["in-process"][(rnd, client)] = upload
            return upload

    class Recording(FlowerEngine):
        def tamper(self, rnd, client, upload):  # type: ignore[no-untyped-def]
            received["flower"][(rnd, client)] = upload
            return upload

    expected = InProcess(config, tmp_path / "in-process", quiet=True, report=False).run()
    settings = FlowerRunSettings.for_experiment(config)
    grid = LoopbackGrid(settings, num_nodes=3)
    from fedtreelora.engines.flower.node import node_client

    node_experiment = FlowerRunSettings.from_run_config(settings.to_run_config()).experiment
    for context in grid.contexts.values():
        (mech,) = node_client(node_experiment, context.node_config).fed.upload_transforms
        assert isinstance(mech, GaussianUpdate) and mech.noise_std == pytest.approx(0.05)
    summary = Recording(config, grid, tmp_path / "run", quiet=True, report=False).run()
    flower, local = received["flower"], received["in-process"]
    assert sorted(flower) == sorted(local) == [(r, k) for r in range(2) for k in range(3)]
    for key, upload in flower.items():
        assert upload.keys() == local[key].keys()
        assert all(upload[x].equal(local[key][x]) for x in upload), key
    assert summary["privacy"] == expected["privacy"] and summary["privacy"]["epsilon"] > 0
    assert [h["epsilon"] for h in summary["history"]] == [h["epsilon"] for h in expected["history"]]
