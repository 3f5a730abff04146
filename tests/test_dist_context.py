"""DistContext and init_distributed without starting processes: what a rank is, when a
process group exists, and what the process group is built from (the store and its
namespace are recorded instead of opened)."""

import pytest
import torch

from cifar_ddp import distributed
from cifar_ddp.distributed import DistContext, init_distributed


def test_only_global_rank_0_is_main():
    # Node 2 of a two-node job: global rank 1, local rank 0. It must not write files.
    assert not DistContext(rank=1, world_size=2, local_rank=0, backend="gloo").is_main
    assert DistContext(rank=0, world_size=2, local_rank=0, backend="gloo").is_main


def test_a_launched_single_process_is_distributed_and_a_plain_one_is_not():
    assert DistContext(rank=0, world_size=1, backend="gloo").is_distributed
    assert not DistContext().is_distributed
    # Without a group, collectives are the identity and gathering gives one entry.
    alone = DistContext()
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(alone.sum(x), x) and alone.sum(x) is not x and alone.gather_objects("a") == ["a"]


@pytest.fixture
def recorded(monkeypatch):
    calls = {}

    class Store:
        def __init__(self, host, port, world_size, is_master, timeout, wait_for_workers):
            calls["store"] = dict(host=host, port=port, world_size=world_size, is_master=is_master)

    def prefix_store(prefix, store):
        calls["prefix"] = prefix
        return store

    def init_process_group(backend, store, rank, world_size, timeout):
        calls["group"] = dict(backend=backend, rank=rank, world_size=world_size)

    monkeypatch.setattr(distributed.dist, "TCPStore", Store)
    monkeypatch.setattr(distributed.dist, "PrefixStore", prefix_store)
    monkeypatch.setattr(distributed.dist, "init_process_group", init_process_group)
    for name in ("TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    monkeypatch.setenv("MASTER_PORT", "29611")
    monkeypatch.setenv("WORLD_SIZE", "4")
    return calls


@pytest.mark.parametrize("rank, agent_store, hosts", [
    ("0", None, True),        # launched without torchrun's agent: rank 0 hosts the store
    ("2", None, False),
    ("0", "True", False),     # torchrun's agent already hosts it on MASTER_PORT
])
def test_the_store_is_hosted_by_rank_0_unless_the_agent_hosts_it(recorded, monkeypatch, rank, agent_store, hosts):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("LOCAL_RANK", rank)
    if agent_store:
        monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", agent_store)
    ctx = init_distributed("cpu")
    assert recorded["store"] == dict(host="10.0.0.7", port=29611, world_size=4, is_master=hosts)
    assert recorded["group"] == dict(backend="gloo", rank=int(rank), world_size=4)
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.restart_count) == (int(rank), 4, "gloo", 0)


def test_each_restart_attempt_gets_its_own_store_namespace(recorded, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    for attempt in ("0", "3"):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", attempt)
        ctx = init_distributed("cpu")
        assert recorded["prefix"] == f"cifar_ddp/attempt{attempt}" and ctx.restart_count == int(attempt)


def test_without_a_launcher_no_group_is_formed(recorded, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    ctx = init_distributed("cpu")
    assert not ctx.is_distributed and ctx.world_size == 1 and "store" not in recorded
