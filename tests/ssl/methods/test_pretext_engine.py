"""Pretext methods and the engine's guarantees: 2 DDP processes equal 1 process; a resumed run equals an
uninterrupted one, bit for bit."""

from __future__ import annotations

import pytest
import torch

from ddp_helpers import run_ddp
from method_helpers import tiny_engine, tiny_images
from pretext_ddp_helpers import DDP_METHODS, run_all


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return tiny_images(tmp_path_factory.mktemp("pretext_engine"), n=16)


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(images):
    """2 gloo processes x 4 images == 1 process x 8 images: logged losses, gradient norms, weights after 2 steps.

    Weights to 1e-5: the key part of a qkv bias gets a gradient that is zero up to rounding (softmax ignores a
    shift shared by all keys), and Adam scales that rounding noise (different for 4 + 4 and 8 images) up to
    ~2e-6 after two steps.
    """
    one = run_all(images, 2)
    two = run_ddp(2, run_all, images, 2)[0]
    for method in DDP_METHODS:
        assert len(two[method]["values"]) == 2
        for step, (v1, v2) in enumerate(zip(one[method]["values"], two[method]["values"])):
            for key in ("loss/total", "grad_norm/head", "grad_norm/backbone"):
                assert v2[key] == pytest.approx(v1[key], rel=1e-5, abs=1e-6), (method, step, key)
        for k, v in one[method]["weights"].items():
            torch.testing.assert_close(two[method]["weights"][k], v, rtol=1e-5, atol=1e-5, msg=f"{method} {k}")


@pytest.mark.parametrize("method,section", [
    ("relative_position", {"patch_size": 14, "gap": 4, "jitter": 1, "head_hidden_dim": 32}),
    ("context_encoder", {"decoder_dim": 32, "adversarial_weight": 0.001, "discriminator_dim": 4}),
])
def test_resume_is_bit_exact(method, section, images):
    def engine():
        return tiny_engine(method, "cnn", images, section=section, epochs=2, lr=0.05, warmup_epochs=0)

    straight = engine()
    for _ in straight.steps(0, 3):
        pass
    first = engine()
    for _ in first.steps(0, 1):
        pass
    state = {k: v for k, v in first.state_dict().items()}
    resumed = engine()
    resumed.load_state_dict(state)
    for _ in resumed.steps(1, 3):  # crosses into the second epoch
        pass
    for k, v in straight.method.state_dict().items():
        assert torch.equal(resumed.method.state_dict()[k], v), k


@pytest.mark.parametrize("method,kind,section", [
    ("mae", "vit", DDP_METHODS["mae"]),
    ("rotation", "cnn", {"head_hidden_dim": 32}),
])
def test_finetune_warms_up_the_head_then_trains_the_last_block(method, kind, section, images):
    from dinoflow.train.config import FinetuneConfig
    from dinoflow.train.engine import RunSpec, make_engine
    from method_helpers import tiny_encoder, tiny_train_config

    ft = FinetuneConfig(head_warmup_epochs=1, lr_head=0.01, lr_backbone=0.001, layer_decay=1.0)
    eng = make_engine(RunSpec(method, section, "last1", tiny_train_config(epochs=2), ft, 0), tiny_encoder(kind),
                      images)
    m = eng.method
    _, blocks, tail = m.backbone.block_groups()
    last = {f"backbone.{n}" for n in blocks[-1] + tail}
    heads = {n for n, p in m.named_parameters() if not n.startswith("backbone.") and p.requires_grad}
    assert heads  # the decoder / classifier

    def snapshot():
        return {k: v.detach().clone() for k, v in m.named_parameters()}

    snaps = [snapshot()]
    for it, _ in eng.steps():
        if it % eng.steps_per_epoch == eng.steps_per_epoch - 1:
            snaps.append(snapshot())

    def changed(a, b):
        return {k for k in a if not torch.equal(a[k], b[k])}

    assert changed(snaps[0], snaps[1]) <= heads and changed(snaps[0], snaps[1])   # warm-up: heads only
    assert changed(snaps[1], snaps[2]) & last                                       # then the last block too
    assert changed(snaps[1], snaps[2]) <= heads | last
