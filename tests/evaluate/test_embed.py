"""`dinoflow embed`: the eval transform against timm's, and the Parquet written for a tiny random encoder."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dinoflow import paths
from dinoflow.config import load_params
from dinoflow.data.transforms import EvalTransform, Normalize, eval_transform
from dinoflow.errors import DinoflowError
from dinoflow.evaluate.embed import read_embeddings, read_embeddings_metadata


def test_eval_transform_matches_timm():
    import timm.data

    cfg = {"input_size": (3, 28, 28), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
           "std": (0.229, 0.224, 0.225), "crop_pct": 1.0, "crop_mode": "center"}
    rng = np.random.default_rng(0)
    # a smooth image (resampling kernels differ only on sharp edges between PIL and torch)
    yy, xx = np.mgrid[0:64, 0:80]
    arr = np.stack([127 + 100 * np.sin(xx / 9.0), 127 + 100 * np.cos(yy / 7.0), 60 + xx + yy * 0], -1)
    img = Image.fromarray(np.clip(arr + rng.normal(0, 2, arr.shape), 0, 255).astype(np.uint8))
    ours = eval_transform(cfg)(img)
    ref = timm.data.create_transform(**cfg, is_training=False)(img)
    assert ours.shape == ref.shape == (3, 28, 28)
    assert (ours - ref).abs().mean() < 0.02
    u8 = EvalTransform(cfg)(img)
    assert u8.dtype == torch.uint8 and u8.shape == (3, 28, 28)
    np.testing.assert_allclose(Normalize(cfg)(u8[None])[0], ours, atol=1e-6)


@pytest.fixture
def embedded(random_model_workspace):
    """Ingest + preprocess the tiny collection, save the random model, run `dinoflow embed`."""
    from dinoflow.evaluate import embed

    params, encoder = random_model_workspace
    embed.main(params, model="random")
    return params, encoder


def test_embed_writes_schema_and_known_values(embedded):
    from dinoflow.data.store import ImageStore

    params, encoder = embedded
    out = paths.embeddings("random")
    schema = pq.read_schema(out)
    dim = encoder.embed_dim
    assert schema.field("id").type == pa.string()
    for col in ("cls", "patch_mean"):
        assert schema.field(col).type == pa.list_(pa.float32(), dim)  # FixedSizeList<float32>[D]
    meta = read_embeddings_metadata(out)
    assert meta["model"] == "random" and meta["stand_in"] is False and meta["weights_source"].startswith("random")
    assert len(meta["params_hash"]) == 16
    ids, cls = read_embeddings(out, "cls")
    manifest = pd.read_parquet(paths.MANIFEST)
    assert list(ids) == manifest.loc[manifest["status"] == "ok", "id"].tolist()
    assert cls.dtype == np.float32 and cls.shape == (len(ids), dim)
    # known answer: the same encoder on the same stored image, transformed by hand
    store = ImageStore(paths.PROCESSED_DIR)
    cfg = encoder.data_config
    x = Normalize(cfg)(EvalTransform(cfg)(store.get_by_id(ids[3]))[None])
    with torch.no_grad():
        ref = encoder.eval().embed(x)
    np.testing.assert_allclose(cls[3], ref["cls"][0].numpy(), rtol=1e-4, atol=1e-5)
    _, pm = read_embeddings(out, "patch_mean")
    np.testing.assert_allclose(pm[3], ref["patch_mean"][0].numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(DinoflowError, match="nope"):
        read_embeddings(out, "nope")


@pytest.mark.slow
def test_evaluation_stages_through_the_cli(embedded, monkeypatch):
    """embed (fixture) -> neighbours, embed-text, align, groups, probes via `dinoflow <stage>`; outputs agree by id."""
    from dinoflow.cli import main as cli
    from dinoflow.utils import read_json

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for argv in (["neighbours", "--model", "random"], ["embed-text"], ["align", "--model", "random"],
                 ["groups"], ["probes", "--model", "random"]):
        assert cli(argv) == 0, argv
    ids, _ = read_embeddings(paths.embeddings("random"))
    nb = pq.read_table(paths.neighbours("random")).to_pandas()
    assert set(nb["query_id"]) == set(ids) and nb["rank"].max() == 3
    al = read_json(paths.align_metrics("random"))
    cap = al["fields"]["caption"]
    assert cap["n_items"] + cap["n_without_text"] == len(ids) == 24 and cap["n_without_text"] == 4
    assert cap["method"] == "exact" and -1 <= cap["spearman"] <= 1
    pr = read_json(paths.probe_metrics("random"))
    assert set(pr["columns"]) == {"shape", "color"}
    assert cli(["align", "--model", "missing-model"]) == 2  # a DinoflowError, not a traceback


@pytest.mark.parametrize("fmt, opts", [("WEBP", {"quality": 90, "method": 2}), ("PNG", {}),
                                       ("JPEG", {"quality": 90})])
def test_decode_rgb_equals_pil(fmt, opts):
    """torchvision.io decoding (the embed stage's) gives PIL's pixels, the reference the store serves."""
    import io

    from dinoflow.data.transforms import decode_rgb

    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, fmt, **opts)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        ref = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    got = decode_rgb(buf.getvalue())
    assert got.dtype == torch.uint8 and got.shape == (3, 40, 56)
    np.testing.assert_array_equal(got.numpy(), ref)
    gray = io.BytesIO()
    img.convert("L").save(gray, "PNG")  # one channel in, RGB out
    np.testing.assert_array_equal(decode_rgb(gray.getvalue()).numpy(),
                                  np.asarray(img.convert("L").convert("RGB")).transpose(2, 0, 1))


def test_eval_transform_same_for_pil_and_tensor_input():
    cfg = {"input_size": (3, 24, 24), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3}
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    t = EvalTransform(cfg)
    a = t(img)
    b = t(torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy()))
    assert a.shape == (3, 24, 24)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    small = torch.zeros(3, 24, 24, dtype=torch.uint8)
    assert t(small) is small  # already the input size: passed through


def test_encoded_images_dataset_equals_store_images(tiny_workspace, monkeypatch):
    from dinoflow.data import ingest, preprocess
    from dinoflow.data.store import ImageStore
    from dinoflow.evaluate.embed import EncodedImages

    monkeypatch.chdir(tiny_workspace)
    params = load_params("params.yaml")
    ingest.main(params)
    preprocess.main(params)
    store = ImageStore(paths.PROCESSED_DIR)
    cfg = {"input_size": (3, 28, 28), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3}
    ds = EncodedImages(store, [2, 0], EvalTransform(cfg))
    assert len(ds) == 2
    for i, pos in enumerate([2, 0]):
        x, j = ds[i]
        assert j == i
        np.testing.assert_array_equal(x.numpy(), EvalTransform(cfg)(store.get(pos)).numpy())


def test_resolve_workers():
    from dinoflow.evaluate.embed import default_workers, resolve_workers

    cpu = torch.device("cpu")
    assert resolve_workers("auto", 10, 64, cpu) == default_workers(10, 64, cpu) == 0
    assert resolve_workers(None, 10**6, 64, cpu) == default_workers(10**6, 64, cpu)
    assert resolve_workers(3, 10, 64, cpu) == 3
    for bad in (-1, "two", 1.5, True):
        with pytest.raises(DinoflowError, match="embed.num_workers"):
            resolve_workers(bad, 10, 64, cpu)
