"""The engine with several methods: bit-exact resume after a kill, 2-process DDP == 1 process, fine-tune phases
(head warm-up, then the chosen blocks) with separate head / backbone lrs."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dinoflow.errors import DinoflowError
from dinoflow.train import checkpoint, engine as engine_mod
from dinoflow.train.config import FinetuneConfig
from dinoflow.train.engine import RunSpec, fit, make_engine
from ddp_helpers import run_ddp
from engine_helpers import run_steps

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ssl" / "methods"))
from method_helpers import SMALL, tiny_encoder, tiny_images, tiny_train_config  # noqa: E402

# a contrastive method with a queue, EMA methods, a clustering method with a queue
SAMPLE = ["moco_v2", "byol", "swav", "dino"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return tiny_images(tmp_path_factory.mktemp("engine"), n=16)


def _fit(method, images, root: Path):
    engine = make_engine(RunSpec(method, SMALL[method], "all", tiny_train_config(epochs=2), None, 0),
                         tiny_encoder("vit"), images)
    fit(engine, "m", {"name": "m"}, "hash", state_path=root / "state.pt", log_dir=root / "log",
        weights_path=root / "weights.safetensors")
    return engine


def _tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}")


@pytest.mark.parametrize("method", SAMPLE)
def test_resume_after_kill_is_bit_exact(method, images, tmp_path, monkeypatch):
    _fit(method, images, tmp_path / "full")  # 2 epochs x 2 steps
    monkeypatch.setenv(engine_mod.STOP_AFTER_ENV, "3")  # killed in epoch 1; last state saved at step 2
    _fit(method, images, tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "weights.safetensors").exists()
    assert checkpoint.load_state(tmp_path / "resumed" / "state.pt")["step"] == 2
    monkeypatch.delenv(engine_mod.STOP_AFTER_ENV)
    _fit(method, images, tmp_path / "resumed")
    full, res = (load_file(tmp_path / d / "weights.safetensors") for d in ("full", "resumed"))
    assert full.keys() == res.keys()
    for k in full:
        assert torch.equal(full[k], res[k]), k
    a, b = (dict(_tensors(checkpoint.load_state(tmp_path / d / "state.pt")["engine"])) for d in ("full", "resumed"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow  # ~40 s each: two spawned processes import torch, timm and lightly
@pytest.mark.parametrize("method", SAMPLE)
def test_ddp_two_processes_match_one_process(method, images):
    """2 gloo processes x 4 images == 1 process x 8 images.

    Step 0 (forward over the gathered batch, global BatchNorm, queue / centre, backward through the gather and
    DDP's averaging): losses and gradient norms equal to float rounding. After that, AdamW turns float-rounding
    noise in gradients that are zero in exact arithmetic (e.g. a bias feeding straight into a BatchNorm) into
    lr-sized steps, so step 1 and the state (weights, teacher, queue, centre) are compared at 1e-3.
    """
    one = run_steps(method, images, 2)
    two = run_ddp(2, run_steps, method, images, 2)[0]
    for step, (v1, v2) in enumerate(zip(one["values"], two["values"], strict=True)):
        for key in [k for k in v1 if k.startswith(("loss", "grad_norm", "teacher/entropy"))]:
            # SwAV: Sinkhorn-Knopp's exp(score / epsilon), epsilon 0.05, magnifies the float rounding of the scores
            # (the projection head runs once on all crops: 16 rows per process vs 32) 20-fold
            rel0 = 5e-5 if method == "swav" else 1e-5
            tol = dict(rel=rel0, abs=1e-6) if step == 0 else dict(rel=1e-3, abs=1e-4)
            assert v2[key] == pytest.approx(v1[key], **tol), (step, key)
    assert one["state"].keys() == two["state"].keys()
    for k, v in one["state"].items():
        if v.is_floating_point():
            torch.testing.assert_close(two["state"][k], v, rtol=1e-3, atol=1e-3, msg=k)
        else:
            assert torch.equal(two["state"][k], v), k


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def test_finetune_head_warmup_then_last_block_with_its_own_lr(images):
    ft = FinetuneConfig(head_warmup_epochs=1, lr_head=0.01, lr_backbone=0.001, layer_decay=1.0)
    spec = RunSpec("byol", SMALL["byol"], "last1", tiny_train_config(epochs=2), ft, 0)
    eng = make_engine(spec, tiny_encoder("vit"), images)
    m = eng.method
    _, blocks, tail = m.backbone.block_groups()
    last = {f"backbone.{n}" for n in blocks[-1] + tail}
    heads = {n for n, _ in m.named_parameters() if n.startswith(("projection_head.", "prediction_head."))}
    target_last = {n.replace("backbone.", "target_backbone.", 1) for n in last}
    target_head = {n for n, _ in m.named_parameters() if n.startswith("target_projection_head.")}
    snaps = [_snapshot(m)]
    seen_phases = []
    for it, values in eng.steps():
        seen_phases.append(eng.phase)
        if it % eng.steps_per_epoch == eng.steps_per_epoch - 1:
            snaps.append(_snapshot(m))
        assert ("finetune/head_loss" in values) == (eng.phase == "head_warmup")
    assert seen_phases == ["head_warmup"] * 2 + ["backbone"] * 2

    def changed(a, b):
        return {k for k in a if not torch.equal(a[k], b[k])}

    assert changed(snaps[0], snaps[1]) == heads | target_head  # epoch 0: heads (and their EMA) only
    assert changed(snaps[1], snaps[2]) == heads | target_head | last | target_last
    groups = {g["schedule"] for g in eng.optimizer.param_groups}
    assert groups == {"lr_head", "lr_backbone"}
    assert (eng.schedules["lr_backbone"][:2] == 0).all()
    assert eng.schedules["lr_head"][0] == pytest.approx(0.01 * 8 / 256)


def test_head_warmup_longer_than_the_run_is_refused(images):
    ft = FinetuneConfig(head_warmup_epochs=2, lr_head=0.01, lr_backbone=0.001, layer_decay=1.0)
    with pytest.raises(DinoflowError, match="head_warmup_epochs"):
        make_engine(RunSpec("simclr", SMALL["simclr"], "last1", tiny_train_config(epochs=2), ft, 0),
                    tiny_encoder("vit"), images)


@pytest.mark.parametrize("method", sorted(SMALL))
def test_every_method_fine_tunes_the_last_block_of_a_cnn_after_the_head_warmup(method, images):
    """`init: pretrained` + `trainable: last1` with any method: epoch 0 leaves the whole backbone untouched (its
    BatchNorm statistics too), epoch 1 changes only the last stage (+ the final conv / norm) of the backbone."""
    ft = FinetuneConfig(head_warmup_epochs=1, lr_head=0.01, lr_backbone=0.01, layer_decay=1.0)
    spec = RunSpec(method, SMALL[method], "last1", tiny_train_config(epochs=2), ft, 0)
    eng = make_engine(spec, tiny_encoder("cnn"), images)
    bb = eng.method.backbone
    _, blocks, tail = bb.block_groups()
    last = set(blocks[-1] + tail)
    states, values = [{k: v.clone() for k, v in bb.state_dict().items()}], []
    for it, v in eng.steps():
        values.append(v)
        if (it + 1) % eng.steps_per_epoch == 0:
            states.append({k: v.clone() for k, v in bb.state_dict().items()})
    assert len(values) == 4 and all(math.isfinite(v["loss/total"]) for v in values)
    assert {g["schedule"] for g in eng.optimizer.param_groups} == {"lr_head", "lr_backbone"}
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # head warm-up: backbone untouched
    changed = {k for k in states[0] if not torch.equal(states[1][k], states[2][k])}
    assert changed and all(k in last or k.rsplit(".", 1)[0] + ".weight" in last for k in changed), sorted(changed)
    params = dict(bb.named_parameters())
    assert all(not torch.equal(states[1][k], states[2][k]) for k in last if k in params and "weight" in k)


def test_adamw_uses_the_fused_kernel_for_cpu_floats_and_foreach_otherwise(images):
    engine = make_engine(RunSpec("simclr", SMALL["simclr"], "all", tiny_train_config(), None, 0),
                         tiny_encoder("vit"), images)
    assert engine.optimizer.defaults["fused"] is True
    meta = {"params": [torch.zeros(2, device="meta")]}
    assert engine_mod.adamw_implementation([meta]) == {"foreach": True}
    assert engine_mod.adamw_implementation([{"params": [torch.zeros(2, dtype=torch.long)]}]) == {"foreach": True}
    assert engine_mod.adamw_implementation([{"params": [torch.zeros(2)]}, meta]) == {"foreach": True}


def test_fused_adamw_steps_follow_the_adamw_formula():
    """Two steps of the engine's AdamW choice against AdamW written out (Loshchilov & Hutter 2019, Alg. 2 with
    PyTorch's bias correction): decoupled decay ``p -= lr * wd * p`` then ``p -= lr * m_hat / (sqrt(v_hat) + eps)``."""
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(5, 3, generator=g)
    grads = [torch.randn(5, 3, generator=g) for _ in range(2)]
    p = p0.clone().requires_grad_(True)
    lr, wd, (b1, b2), eps = 0.1, 0.05, (0.9, 0.999), 1e-8
    groups = [{"params": [p]}]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=wd, **engine_mod.adamw_implementation(groups))
    assert opt.defaults["fused"] is True
    want, m, v = p0.double(), torch.zeros(5, 3, dtype=torch.float64), torch.zeros(5, 3, dtype=torch.float64)
    for t, grad in enumerate(grads, start=1):
        p.grad = grad.clone()
        opt.step()
        gd = grad.double()
        m, v = b1 * m + (1 - b1) * gd, b2 * v + (1 - b2) * gd * gd
        want = want * (1 - lr * wd) - lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
    torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-6)
