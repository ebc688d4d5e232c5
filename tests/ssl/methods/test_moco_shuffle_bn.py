"""MoCo v2's shuffling BN (He et al. 2020 sec. 3.3): a no-op in one process; under DDP the key encoder's rows are
shuffled across processes and come back in their order, and its BatchNorm stays per process."""

from __future__ import annotations

import pytest
import torch

from dinoflow.ssl.methods.base import StepContext, collate_views
from dinoflow.ssl.methods.moco_v2 import shuffled_forward
from dinoflow.train.engine import sync_batchnorm_targets
from ddp_helpers import run_ddp
from method_helpers import tiny_engine, tiny_images
from shuffle_bn_helpers import shuffle_round_trips


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return tiny_images(tmp_path_factory.mktemp("shuffle_bn"), n=8)


def test_one_process_shuffling_is_the_plain_key_encoder(images):
    x = torch.randn(4, 3)
    assert shuffled_forward(lambda t: t - t.mean(0), x, seed=0).equal(x - x.mean(0))
    losses, states = [], []
    for shuffle in (True, False):
        engine = tiny_engine("moco_v2", "cnn", images, section={"shuffle_bn": shuffle}, epochs=1)
        engine.set_epoch(0)
        batch = collate_views([engine.dataset[i] for i in range(8)])
        ctx = StepContext(step=0, epoch=0, total_steps=1, values={"momentum": 0.9})
        losses.append(engine.method.training_step(batch, ctx)["loss"].detach())
        states.append(engine.method.state_dict())
    assert torch.equal(*losses)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # queue and BN statistics too


@pytest.mark.slow  # two spawned processes import torch, timm and lightly (~25 s)
def test_ddp_shuffle_round_trip_restores_order():
    r = run_ddp(2, shuffle_round_trips)[0]
    x = r["x"]                                              # (2 processes, 4 rows, 3)
    assert torch.equal(r["back"], x) and torch.equal(r["again"], x) and torch.equal(r["other"], x)
    seen = r["seen"]                                        # (3 calls, 2 processes, 4 rows, 3)
    for call in seen:  # each call sees a permutation of the global batch, rows split over the processes
        assert sorted(call[..., 0].flatten().tolist()) == list(range(8))
        assert not torch.equal(call, x)
    assert torch.equal(seen[0], seen[1])                    # the same seed: the same permutation
    assert not torch.equal(seen[0], seen[2])                # another seed: another one
    # each process saw rows of the other one, so its batch statistics mix both halves of the global batch
    assert all(set(seen[0][p, :, 0].tolist()) != set(x[p, :, 0].tolist()) for p in range(2))
    # the centring used the shuffled sub-batches' means, unshuffled back to the original rows
    rows = x.reshape(8, 3)
    want = torch.empty_like(rows)
    for p in range(2):
        sub = seen[0][p]
        want[sub[:, 0].long()] = sub - sub.mean(0)
    torch.testing.assert_close(r["centred"].reshape(8, 3), want)
    assert r["rng_untouched"]


def test_the_key_encoder_keeps_per_process_batchnorm_with_shuffling(images):
    """Which modules a scratch DDP run converts to SyncBatchNorm (decided in one process: CPU DDP cannot hold
    SyncBatchNorm layers): the query encoder always, the key encoder only without shuffling BN (global statistics
    would make the shuffle pointless)."""
    on = tiny_engine("moco_v2", "cnn", images, epochs=1).method
    targets = sync_batchnorm_targets(on)
    assert any(t is on.backbone for t in targets) and not any(t is on.key_backbone for t in targets)
    off = tiny_engine("moco_v2", "cnn", images, section={"shuffle_bn": False}, epochs=1).method
    assert any(t is off.key_backbone for t in sync_batchnorm_targets(off))
    byol = tiny_engine("byol", "cnn", images, epochs=1).method  # other methods: every backbone synchronised
    assert {id(t) for t in sync_batchnorm_targets(byol)} >= {id(byol.backbone), id(byol.target_backbone)}
