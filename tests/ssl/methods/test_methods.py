"""Every registered method: its loss equals lightly's implementation (or the paper's formula) on its own outputs,
and a few steps on a fixed tiny batch lower it, with a ViT and a CNN backbone."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import (BarlowTwinsLoss, DINOLoss as LightlyDINOLoss, NegativeCosineSimilarity, NTXentLoss,
                          SwaVLoss, VICRegLoss)

from dinoflow.ssl.methods import available_methods
from dinoflow.ssl.methods._common import FeatureQueue, info_nce
from dinoflow.ssl.methods.base import StepContext
from method_helpers import SMALL, tiny_engine, tiny_images

METHODS = sorted(SMALL)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return tiny_images(tmp_path_factory.mktemp("methods"), n=16)


def _first_batch(engine):
    engine.set_epoch(0)
    return next(iter(engine.loader))


def test_every_family_is_registered():
    assert set(METHODS) <= set(available_methods())


@pytest.mark.parametrize("kind", ["vit", "cnn"])
@pytest.mark.parametrize("method", METHODS)
def test_a_few_steps_on_a_fixed_batch_lower_the_loss(method, kind, images):
    # MoCo v2 starts low (random queue negatives are easy) and needs a larger step to show the fall quickly
    engine = tiny_engine(method, kind, images, epochs=1, lr=0.05 if method == "moco_v2" else 0.01)
    batch = _first_batch(engine)
    fresh_queue = copy.deepcopy(engine.method.queue.state_dict()) if method == "moco_v2" else None
    losses = []
    for _ in range(8):
        if fresh_queue is not None:  # a fixed batch would otherwise meet its own earlier keys in the queue
            engine.method.queue.load_state_dict(fresh_queue)
        values = engine.train_step(batch, 0)
        losses.append(values["loss/total"])
        net = engine.method.evaluated_network  # the network whose embeddings are watched
        assert math.isfinite(values[f"{net}/std"]) and values[f"{net}/std"] > 0 and values[f"{net}/rankme"] >= 1
    assert sum(losses[-3:]) / 3 < losses[0] - max(0.1 * abs(losses[0]), 0.05), losses


def _ctx(values=None):
    return StepContext(step=0, epoch=0, total_steps=1, values=values or {})


def _pooled(backbone, x):
    return backbone.forward_tokens(x)["cls"]


@pytest.mark.parametrize("method", ["simclr", "barlow_twins", "vicreg", "byol", "simsiam", "moco_v3"])
def test_two_view_losses_equal_the_reference(method, images):
    m = tiny_engine(method, "cnn", images).method
    batch = _first_batch(tiny_engine(method, "cnn", images))
    with torch.no_grad():
        got = m.training_step(batch, _ctx())["loss"]
        x0, x1 = batch.views
        h0, h1 = _pooled(m.backbone, x0), _pooled(m.backbone, x1)
        if method == "simclr":
            want = NTXentLoss(temperature=m.cfg.temperature)(m.projection_head(h0), m.projection_head(h1))
        elif method == "barlow_twins":
            want = BarlowTwinsLoss(lambda_param=m.cfg.lambda_param)(m.projection_head(h0), m.projection_head(h1))
        elif method == "vicreg":
            want = VICRegLoss()(m.projection_head(h0), m.projection_head(h1))
        elif method in ("byol", "simsiam"):
            p0, p1 = (m.prediction_head(m.projection_head(h)) for h in (h0, h1))
            if method == "byol":
                z0, z1 = (m.target_projection_head(_pooled(m.target_backbone, x)) for x in (x0, x1))
            else:
                z0, z1 = m.projection_head(h0), m.projection_head(h1)
            ncs = NegativeCosineSimilarity()
            want = 0.5 * (ncs(p0, z1) + ncs(p1, z0))
        else:  # MoCo v3 pseudo-code (Chen et al. 2021, Alg. 1)
            q0, q1 = (F.normalize(m.prediction_head(m.projection_head(h)), dim=1) for h in (h0, h1))
            k0, k1 = (F.normalize(m.momentum_projection_head(_pooled(m.momentum_backbone, x)), dim=1)
                      for x in (x0, x1))
            t = m.cfg.temperature

            def ctr(q, k):
                return F.cross_entropy(q @ k.t() / t, torch.arange(q.shape[0])) * 2 * t

            want = ctr(q0, k1) + ctr(q1, k0)
    torch.testing.assert_close(got, want.reshape(()), rtol=1e-5, atol=1e-6)


def test_moco_queue_loss_equals_lightly_ntxent_with_the_same_memory_bank():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    queue = F.normalize(torch.randn(32, 16, generator=g), dim=1)
    ref = NTXentLoss(temperature=0.2, memory_bank_size=(32, 16))
    ref.memory_bank.bank.copy_(queue)
    torch.testing.assert_close(info_nce(q, k, queue, 0.2), ref(q, k))


def test_moco_v2_step_uses_the_queue_then_enqueues_the_keys(images):
    engine = tiny_engine("moco_v2", "cnn", images, section={"queue_size": 64})
    m, batch = engine.method, _first_batch(engine)
    before = m.queue.features.clone()
    with torch.no_grad():
        got = m.training_step(batch, _ctx())["loss"]
        q = m.projection_head(_pooled(m.backbone, batch.views[0]))
        k = F.normalize(m.key_projection_head(_pooled(m.key_backbone, batch.views[1])), dim=1)
    torch.testing.assert_close(got, info_nce(q, k, before, m.cfg.temperature))
    torch.testing.assert_close(m.queue.features[:8], k)  # the keys went in at the pointer
    assert torch.equal(m.queue.features[8:], before[8:]) and int(m.queue.ptr) == 8
    assert {"queue.features", "queue.ptr"} <= set(m.state_dict())  # saved with the state: resume is exact


def test_feature_queue_is_fifo_and_wraps():
    qu = FeatureQueue(5, 2, seed=0)
    for i in range(3):
        qu.push(torch.full((2, 2), float(i)))
    assert qu.features[:, 0].tolist() == [2.0, 0.0, 1.0, 1.0, 2.0]  # 0 -> rows 0-1, 1 -> 2-3, 2 -> 4, 0
    assert int(qu.ptr) == 1 and int(qu.filled) == 5


def test_swav_loss_equals_lightly_with_multicrop(images):
    engine = tiny_engine("swav", "cnn", images, section={"queue_size": 0})
    m, batch = engine.method, _first_batch(engine)
    assert len(batch.views) == 4 and batch.views[2].shape[-1] == 14  # 2 global + 2 local crops
    with torch.no_grad():
        got = m.training_step(batch, _ctx())["loss"]
        # the official SwAV forward: one backbone call per resolution (BatchNorm statistics over its crops), then
        # the projection head once on every crop's embedding
        h = [_pooled(m.backbone, torch.cat(batch.views[:2])), _pooled(m.backbone, torch.cat(batch.views[2:]))]
        z = F.normalize(m.projection_head(torch.cat(h)), dim=1)
        out = [m.prototypes(c) for c in z.split(batch.views[0].shape[0])]
        want = SwaVLoss(temperature=m.cfg.temperature, sinkhorn_iterations=m.cfg.sinkhorn_iterations,
                        sinkhorn_epsilon=m.cfg.sinkhorn_epsilon)(out[:2], out[2:])
    torch.testing.assert_close(got, want.reshape(()))
    for layer in m.prototypes.heads:  # unit-norm prototypes
        torch.testing.assert_close(layer.weight.norm(dim=1), torch.ones(layer.weight.shape[0]))


def test_swav_queue_joins_sinkhorn_once_full(images):
    engine = tiny_engine("swav", "cnn", images, section={"queue_size": 16})
    values = [v for _, v in engine.steps()]  # 2 epochs x 2 steps of 8 images: full after 2 steps
    assert all(math.isfinite(v["loss/total"]) for v in values)
    assert int(engine.method.queues[0].filled) == 16


def test_dino_v1_loss_equals_lightly(images):
    engine = tiny_engine("dino", "vit", images)
    m, batch = engine.method, _first_batch(engine)
    with torch.no_grad():
        got = m.training_step(batch, _ctx({"teacher/temp": 0.04}))
        g = torch.cat(batch.views[:2])
        t = m.teacher_head(_pooled(m.teacher_backbone, g)).chunk(2)
        s = list(m.head(_pooled(m.backbone, g)).chunk(2)) + list(
            m.head(_pooled(m.backbone, torch.cat(batch.views[2:]))).chunk(2))
        ref = LightlyDINOLoss(output_dim=m.cfg.out_dim, teacher_temp=0.04, student_temp=m.cfg.student_temp,
                              center_momentum=m.cfg.center_momentum)
        want = ref(list(t), s, teacher_temp=0.04)
    torch.testing.assert_close(got["loss"], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.dino_loss.center, ref.center.reshape(1, -1))  # same EMA centre update
    probs = got["targets"]
    assert probs.shape == (2 * batch.size, m.cfg.out_dim)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2 * batch.size))
    entropy = float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean())
    assert 0 < entropy <= math.log(m.cfg.out_dim) + 1e-4
    assert float(got["dino_kl"]) == pytest.approx(float(got["loss"]) - entropy, abs=1e-5)
