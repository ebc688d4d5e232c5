"""DINOv2 on the engine, through `dinoflow train`: loss falls, freezing, exact resume, DDP equivalence, NaN stop,
the outputs of the train stage, parameter groups, gradient checkpointing and bf16."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dinoflow import paths
from dinoflow.config import ConfigError, uses_lr_search, validate_params
from dinoflow.errors import DinoflowError
from dinoflow.models.factory import create_encoder
from dinoflow.train import checkpoint, engine, run
from dinoflow.train.engine import GlobalBatchSampler, make_engine
from dinoflow.utils import read_json, seed_everything
from ddp_helpers import run_ddp
from train_helpers import make_env, run_steps


@pytest.fixture
def env(tmp_path: Path, monkeypatch) -> tuple[dict, list]:
    params, images = make_env(tmp_path)
    monkeypatch.chdir(tmp_path / "ws")
    return params, images


def _train(params, images, model):
    seed_everything(params["seed"])
    encoder, info = create_encoder(params, model)
    return run.train_model(params, model, encoder, info, images=images)


def _curve(model: str, name: str) -> np.ndarray:
    import pandas as pd

    df = pd.read_csv(Path(paths.train_log_dir(model)) / "plots" / "metrics" / f"{name}.tsv", sep="\t")
    return df.iloc[:, -1].to_numpy()


def test_loss_falls_on_tiny_collection(env):
    params, images = env
    # A teacher that follows the student quickly and no warm-ups, so a few steps show learning.
    params["train"].update(epochs=3, warmup_epochs=0)
    params["methods"]["dinov2"].update(momentum=0.9, warmup_teacher_temp_epochs=0, freeze_last_layer_epochs=0)
    (Path(paths.LR_SEARCH_BEST)).write_text('{"lr": 0.05}')
    _train(params, images, "scratch")
    total = _curve("scratch", "loss/total")
    assert len(total) == 9 and np.isfinite(total).all()
    assert total[-3:].mean() < 0.8 * total[0], total
    # CE >= H(teacher): the logged KL part of the DINO loss is non-negative and equals CE - entropy
    kl = _curve("scratch", "dino_kl")
    assert (kl >= -1e-5).all()
    np.testing.assert_allclose(kl, _curve("scratch", "loss/dino") - _curve("scratch", "teacher/entropy"), atol=1e-5)
    for name in ("loss/dino", "loss/ibot", "loss/koleo", "teacher/entropy", "teacher/entropy_fraction",
                 "teacher/std", "teacher/rankme", "lr", "wd", "momentum", "teacher/temp"):
        assert len(_curve("scratch", name)) == 9, name
    # RankMe of the centred teacher CLS tokens of the batch's 2 x 8 global crops: between 1 and 15
    assert ((_curve("scratch", "teacher/rankme") >= 1) & (_curve("scratch", "teacher/rankme") <= 15)).all()
    # lr follows the schedule scaled by batch/256 (no warm-up here: the first step is the peak)
    assert _curve("scratch", "lr")[0] == pytest.approx(0.05 * 8 / 256)
    info = read_json(paths.model_info("scratch"))
    assert info["train"]["lr_overrides"] == {"lr": 0.05} and info["train"]["method"] == "dinov2"
    # contract 2: the verdict over the last epoch's monitors, the drift from the initial weights, the network
    assert info["evaluated_network"] == "teacher" and info["init_values"] is None
    c = info["collapse"]
    assert c["verdict"] in ("healthy", "uniform_collapse", "one_hot_collapse", "dimensional_collapse")
    assert c["teacher_entropy"] == pytest.approx(_curve("scratch", "teacher/entropy")[-3:].mean(), rel=1e-5)
    assert c["student_teacher_kl"] == pytest.approx(kl[-3:].mean(), rel=1e-5, abs=1e-6)
    assert c["rankme"] == pytest.approx(_curve("scratch", "teacher/rankme")[-3:].mean(), rel=1e-5)
    assert c["log_k"] == pytest.approx(math.log(params["methods"]["dinov2"]["out_dim"])) and c["embed_dim"] == 32
    d = info["drift"]
    assert d["n_images"] == len(images) and -1 <= d["ci95"][0] <= d["median_cosine"] <= d["ci95"][1] <= 1
    assert d["median_cosine"] < 0.999  # lr 0.05 for 9 steps moves a random ViT
    assert info["trainable_params"] == info["total_params"] and info["trainable_share"] == 1.0
    live = read_json(Path(paths.train_log_dir("scratch")) / "metrics.json")
    assert live["collapse"]["verdict"] == c["verdict"]
    assert live["drift"]["median_cosine"] == pytest.approx(d["median_cosine"])
    assert set(load_file(paths.model_weights("scratch"))) == set(create_encoder(params, "scratch")[0].state_dict())


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def test_freezing_only_intended_parameters_change(env):
    """Fine-tune of a ViT, last1: epoch 0 = head warm-up (backbone frozen, prototypes frozen); epoch 1 = last block
    + final norm train too; nothing else ever changes, bit for bit, in the student or the teacher."""
    params, images = env
    run.main(params, "base")
    params["finetune"].update(head_warmup_epochs=1, lr_head=0.01, lr_backbone=0.01)
    params["methods"]["dinov2"]["freeze_last_layer_epochs"] = 1
    seed_everything(params["seed"])
    encoder, _ = create_encoder(params, "vit_ft")
    eng = make_engine(run.run_spec(params, "vit_ft"), encoder, images)
    m = eng.method
    assert eng.epochs == 2 and m.cfg.freeze_last_layer_epochs == 1
    _, blocks, tail = m.backbone.block_groups()
    last_block = {f"backbone.{n}" for n in blocks[-1] + tail}
    assert any("norm" in n for n in last_block)

    def split(snap):  # (student, teacher) with the same names
        student = {k: v for k, v in snap.items() if not k.startswith("teacher_")}
        teacher = {k[len("teacher_"):]: v for k, v in snap.items() if k.startswith("teacher_")}
        return student, teacher

    snaps = [split(_snapshot(m))]
    for it, _ in eng.steps():
        if (it + 1) % eng.steps_per_epoch == 0:
            snaps.append(split(_snapshot(m)))

    def changed(a, b):
        return {k for k in a if not torch.equal(a[k], b[k])}

    heads_mlp = {k for k in snaps[0][0] if k.startswith("head.mlp")}
    prototypes = {k for k in snaps[0][0] if k.startswith("head.last_layer") and "original1" in k}
    for who in (0, 1):  # student, teacher
        warmup = changed(snaps[0][who], snaps[1][who])
        assert warmup == heads_mlp, sorted(warmup ^ heads_mlp)
        second = changed(snaps[1][who], snaps[2][who])
        assert second == heads_mlp | prototypes | last_block, sorted(second ^ (heads_mlp | prototypes | last_block))


def test_resume_after_kill_gives_exactly_the_uninterrupted_weights(tmp_path, monkeypatch):
    def run_in(name: str, stop_after: int | None):
        root = tmp_path / name
        params, images = make_env(root)
        params["train"]["checkpoint_every"] = 2
        monkeypatch.chdir(root / "ws")
        if stop_after:
            monkeypatch.setenv(engine.STOP_AFTER_ENV, str(stop_after))
            _train(params, images, "scratch")  # "killed" in epoch 1 after step 5; last saved state: step 4
            assert not Path(paths.model_weights("scratch")).exists()
            assert checkpoint.load_state(paths.train_state("scratch"))["step"] == 4
            monkeypatch.delenv(engine.STOP_AFTER_ENV)
        _train(params, images, "scratch")
        return (load_file(paths.model_weights("scratch")),
                checkpoint.load_state(paths.train_state("scratch")), _curve("scratch", "loss/total"))

    w_full, s_full, loss_full = run_in("full", None)
    w_res, s_res, loss_res = run_in("resumed", 5)
    assert w_full.keys() == w_res.keys()
    for k in w_full:
        assert torch.equal(w_full[k], w_res[k]), k

    def tensors(obj, prefix=""):
        if isinstance(obj, torch.Tensor):
            yield prefix, obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                yield from tensors(v, f"{prefix}.{k}")

    a, b = dict(tensors(s_full["engine"])), dict(tensors(s_res["engine"]))
    assert a.keys() == b.keys() and len(a) > 50
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert s_full["step"] == s_res["step"] == 6
    np.testing.assert_array_equal(loss_full, loss_res)  # the replayed steps were logged once


def test_ddp_two_processes_match_one_process(tmp_path, monkeypatch):
    """2 gloo processes x 4 images == 1 process x 8 images: losses (DINO, iBOT, KoLeo over the gathered batch),
    gradient norms (after DDP's averaging) and the weights after two optimizer steps.

    Two steps, not more: KoLeo's nearest-neighbour argmax on near-identical random-init features can flip on
    float rounding (which differs between batch sizes) after a few updates, which is not what is tested here.
    """
    params, images = make_env(tmp_path)
    params["train"]["warmup_epochs"] = 0  # the first step already moves the weights
    # timm's LayerScale (1e-5): without it the key bias, whose exact gradient is 0 (softmax ignores a shift shared by
    # all keys), gets float-rounding gradients large enough that Adam's normalised first steps turn their different
    # rounding under 1 and 2 processes into differences of ~lr, beyond the tolerance below.
    params["backbone"]["init_values"] = 1e-5
    monkeypatch.chdir(tmp_path / "ws")
    one = run_steps(params, images, n_steps=2)
    two = run_ddp(2, run_steps, params, images, 2)[0]
    assert len(two["values"]) == 2
    for step, (v1, v2) in enumerate(zip(one["values"], two["values"])):
        for key in ("loss/dino", "loss/ibot", "loss/koleo", "loss/total", "teacher/entropy", "grad_norm/head",
                    "grad_norm/backbone"):
            assert v2[key] == pytest.approx(v1[key], rel=1e-5, abs=1e-6), (step, key)
    for who in ("student", "teacher"):
        for k, v in one[who].items():
            got = two[who][k]
            torch.testing.assert_close(got, v, rtol=1e-5, atol=1e-6, msg=f"{who} {k}")


def test_nan_loss_stops_with_clear_error(env):
    params, images = env
    seed_everything(params["seed"])
    encoder, info = create_encoder(params, "scratch")
    with torch.no_grad():
        encoder.model.blocks[0].mlp.fc1.weight[0, 0] = math.nan  # corrupted weights: NaN from the first step
    with pytest.raises(DinoflowError, match=r"loss is nan at step 0.*Lower train\.lr"):
        run.train_model(params, "scratch", encoder, info, images=images)


def test_method_none_saves_initial_weights(env):
    params, _ = env
    run.main(params, "base")
    saved = load_file(paths.model_weights("base"))
    fresh, _ = create_encoder(params, "base")
    for k, v in fresh.state_dict().items():
        assert torch.equal(saved[k], v), k
    assert read_json(paths.model_info("base"))["init"] == "random"
    assert not Path(paths.train_state("base")).exists()


def test_scratch_without_lr_search_says_what_to_run(env):
    params, images = env
    Path(paths.LR_SEARCH_BEST).unlink()
    with pytest.raises(DinoflowError, match="lr-search"):
        _train(params, images, "scratch")


def test_lr_search_use_is_decided_in_one_place(env):
    params, _ = env
    assert [uses_lr_search(params, m["name"]) for m in params["models"]] == [False, False, True, False, False, False,
                                                                             False]
    params["models"].append({"name": "ft_search", "init": "pretrained", "method": "dinov2", "trainable": "last1",
                             "lr_from_search": True})
    with pytest.raises(ConfigError, match=r"models\[ft_search\].lr_from_search: .*finetune.lr_head"):
        validate_params(params)
    params["models"][-1] = {"name": "other", "init": "random", "method": "simclr", "trainable": "all",
                            "lr_from_search": True}
    with pytest.raises(ConfigError, match=r"lr search runs method 'dinov2'"):
        validate_params(params)
    params["models"][-1] = {"name": "other", "init": "random", "method": "simclr", "trainable": "all"}
    validate_params(params)
    assert not uses_lr_search(params, "other")  # another method: its own train.lr


def test_unknown_method_and_bad_method_knob_are_config_errors(env):
    params, _ = env
    params["models"][1]["method"] = "dino_v9"
    with pytest.raises(ConfigError, match=r"'dino_v9' is not a registered method \(known: none, .*simclr"):
        validate_params(params)
    params["models"][1]["method"] = "dinov2"
    params["methods"]["dinov2"]["centring"] = "x"
    with pytest.raises(ConfigError, match=r"methods.dinov2: unknown key\(s\) centring"):
        validate_params(params)


def test_global_batches_do_not_depend_on_process_count():
    one = GlobalBatchSampler(24, 8, 3, seed=0)
    two = [GlobalBatchSampler(24, 8, 3, seed=0, rank=r, world_size=2) for r in range(2)]
    for s in [one, *two]:
        s.set_epoch(1)
    joined = [a + b for a, b in zip(*two)]
    assert list(one) == joined
    assert sorted(i for b in one for i in b) == list(range(24))  # a permutation: every image once per epoch
    one.set_epoch(1, start_step=2)
    assert list(one) == joined[2:]
    with pytest.raises(DinoflowError, match="divisible"):
        GlobalBatchSampler(24, 7, 3, seed=0, rank=0, world_size=2)


def test_param_groups_weight_decay_and_layer_decay(env):
    """No weight decay on biases / norms / 1-d tensors; fine-tune lrs: head vs backbone, DINOv2 layer decay."""
    params, images = env
    run.main(params, "base")
    params["finetune"].update(layer_decay=0.5, lr_head=0.01, lr_backbone=0.001)
    params["models"][-1]["trainable"] = "last2"
    encoder, _ = create_encoder(params, "vit_ft")
    eng = make_engine(run.run_spec(params, "vit_ft"), encoder, images)
    name_of = {id(p): n for n, p in eng.method.named_parameters()}
    seen = set()
    for g in eng.optimizer.param_groups:
        for p in g["params"]:
            n = name_of[id(p)]
            seen.add(n)
            assert g["wd_scale"] == (0.0 if p.ndim <= 1 or n.endswith(".bias") else 1.0), n
            if n.startswith("head."):
                assert (g["schedule"], g["lr_scale"]) == ("lr_head", 1.0), n
            else:  # depth-2 ViT: block 0 -> 0.5**2, block 1 -> 0.5**1, final norm -> 1
                want = 0.25 if ".blocks.0." in n else 0.5 if ".blocks.1." in n else 1.0
                assert (g["schedule"], g["lr_scale"]) == ("lr_backbone", want), n
    frozen = {n for n, _ in eng.method.named_parameters() if not n.startswith("teacher_")} - seen
    # not optimised: the embedding stem (last2 of 2 blocks) and the prototypes' fixed unit magnitude (weight_norm g)
    assert frozen == {"backbone.mask_token", "backbone.model.cls_token", "backbone.model.pos_embed",
                      "backbone.model.patch_embed.proj.weight", "backbone.model.patch_embed.proj.bias",
                      "head.last_layer.parametrizations.weight.original0"}
    # backbone lr is 0 during the head warm-up epoch, then warms up from 0 to its peak (scaled by batch / 256)
    lr_bb = eng.schedules["lr_backbone"]
    assert (lr_bb[:3] == 0).all() and lr_bb[3:].max() == pytest.approx(0.001 * 8 / 256)


def test_grad_checkpointing_gives_the_same_step_and_bf16_autocast_runs(env):
    params, images = env
    params["train"]["warmup_epochs"] = 0
    plain = run_steps(params, images, n_steps=2)
    params["train"]["grad_checkpointing"] = True
    ckpt = run_steps(params, images, n_steps=2)
    for v1, v2 in zip(plain["values"], ckpt["values"]):
        assert v2["loss/total"] == pytest.approx(v1["loss/total"], rel=1e-6)
    for k, v in plain["student"].items():
        torch.testing.assert_close(ckpt["student"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    params["train"].update(grad_checkpointing=False, amp=True)
    amp = run_steps(params, images, n_steps=2)
    assert all(math.isfinite(v["loss/total"]) for v in amp["values"])
    # bf16 keeps ~3 significant digits: close to the float32 loss, not equal
    assert amp["values"][0]["loss/total"] == pytest.approx(plain["values"][0]["loss/total"], rel=0.05)


def test_evaluate_network_chooses_the_saved_backbone(env):
    """teacher: the EMA teacher's backbone is the model; student: the student's (as in the saved train state)."""
    params, images = env
    params["train"].update(warmup_epochs=0)
    params["methods"]["dinov2"].update(momentum=0.5, momentum_end=0.5)
    saved = {}
    prefix = {"teacher": "teacher_backbone.", "student": "backbone."}
    for network in ("teacher", "student", "auto"):
        params["train"]["evaluate_network"] = network
        _train(params, images, "scratch")
        saved[network] = load_file(paths.model_weights("scratch"))
        state = checkpoint.load_state(paths.train_state("scratch"))["engine"]["method"]
        chosen = "teacher" if network == "auto" else network  # DINOv2's own choice: its EMA teacher
        for k, v in saved[network].items():
            assert torch.equal(v, state[prefix[chosen] + k]), (network, k)
        assert read_json(paths.model_info("scratch"))["evaluated_network"] == chosen
    assert any(not torch.equal(saved["teacher"][k], saved["student"][k]) for k in saved["teacher"])


def test_collapse_verdict_warns_or_fails(env):
    """A random ViT with timm's DINOv2 LayerScale init (1e-5) gives every image the same CLS embedding: the
    verdict is uniform collapse; on_collapse: fail stops with the model, the verdict and the numbers."""
    params, images = env
    params["backbone"]["init_values"] = 1e-5
    params["train"]["on_collapse"] = "warn"
    _train(params, images, "scratch")
    info = read_json(paths.model_info("scratch"))
    assert info["collapse"]["verdict"] == "uniform_collapse", info["collapse"]
    assert info["init_values"] == 1e-5
    Path(paths.model_weights("scratch")).unlink()
    Path(paths.train_state("scratch")).unlink()
    params["train"]["on_collapse"] = "fail"
    with pytest.raises(DinoflowError, match=r"model scratch: uniform_collapse .*teacher entropy .*RankMe"):
        _train(params, images, "scratch")
    assert not Path(paths.model_weights("scratch")).exists()


def test_another_method_through_the_train_stage_writes_contract_2(env):
    """`dinoflow train` with SimCLR (no teacher, no targets): the student is saved; the verdict reads the student's
    embeddings only (target terms null); drift is measured; asking for a teacher is refused before training."""
    params, images = env
    params["models"].append({"name": "sim", "init": "random", "method": "simclr", "trainable": "all"})
    params["methods"]["simclr"] = {"hidden_dim": 32, "out_dim": 16}
    validate_params(params)
    _train(params, images, "sim")
    info = read_json(paths.model_info("sim"))
    assert info["evaluated_network"] == "student" and info["train"]["method"] == "simclr"
    assert info["train"]["lr_overrides"] == {}  # not the searched method: train.lr
    c = info["collapse"]
    assert c["verdict"] in ("healthy", "dimensional_collapse") and c["teacher_entropy"] is None
    assert c["rankme"] == pytest.approx(_curve("sim", "student/rankme")[-3:].mean(), rel=1e-5)
    assert c["teacher_std"] == pytest.approx(_curve("sim", "student/std")[-3:].mean(), rel=1e-5)
    assert -1 <= info["drift"]["median_cosine"] <= 1
    params["train"]["evaluate_network"] = "teacher"
    with pytest.raises(DinoflowError, match="evaluate_network: teacher, but method 'simclr' has no teacher"):
        _train(params, images, "sim")


def test_head_warmup_not_below_epochs_is_a_config_error_at_load(env):
    """A newcomer lowering train.epochs to 1 (README: "lower train.epochs ... to fit") with the default
    finetune.head_warmup_epochs 1 learns it when the parameters are read, not after ingest and preprocessing."""
    params, _ = env
    params["train"]["epochs"] = 1
    params["finetune"]["head_warmup_epochs"] = 1
    with pytest.raises(ConfigError, match=r"finetune.head_warmup_epochs \(1\) must be smaller than train.epochs "
                                          r"\(1\), or the backbones of the fine-tunes \['ft_last1'"):
        validate_params(params)
    params["finetune"]["head_warmup_epochs"] = 0
    validate_params(params)
    params["finetune"]["head_warmup_epochs"] = 1
    params["models"] = [m for m in params["models"] if m["init"] == "random" or m["method"] == "none"]
    validate_params(params)  # no fine-tune: nothing to check
