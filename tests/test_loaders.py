"""Both loader backends on the mock shard root: keys, pixels, layout, ranks, resume, bad samples, augmentation."""

import logging
import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from loaders.augment import AugmentConfig, SampleDraw, draw_batch, make_plan
from loaders.loader import LoaderConfig, build_loader
from loaders.source import CorruptSample, check_image
from loaders.sampler import MixConfig, global_order, rank_batch_indices
from loaders.shards import load_shard_root
from sharding.config import from_dict
from sharding.schema import load_schema, total_votes_column, votes_column

MIX = MixConfig(ratios="sdss=0.34,decals=0.33,hst=0.33", global_batch_size=12, epoch_samples=48, seed=0)
MIX_SURVEYS = list(MIX.ratios)
AUGMENT = AugmentConfig(enabled=True, degrade_prob=0.5, degrade_surveys=("hst", "decals"), noise_std=(2.0, 6.0))


def make_config(root, backend="dali", **overrides) -> LoaderConfig:
    return LoaderConfig(**{"shard_root": str(root), "backend": backend, "image_size": 64, "num_workers": 0,
                           **overrides})


def run(cfg, mix=MIX, **kwargs) -> list:
    loader = build_loader(cfg, mix, **kwargs)
    try:
        return list(loader)
    finally:
        loader.close()


def expected_keys(root, mix=MIX, epoch=0, rank=0, world_size=1) -> list[list[str]]:
    """Keys per batch straight from the sampler's global order."""
    surveys = load_shard_root(root, list(mix.ratios))
    order = global_order({s.name: s.shard_counts for s in surveys}, mix, epoch)
    return [[surveys[s].key(shard, index) for s, shard, index in order.samples[rank_batch_indices(
        order, rank, world_size, b)]] for b in range(order.num_batches)]


def to_pixels(images: torch.Tensor, cfg: LoaderConfig) -> torch.Tensor:
    """Normalised images back to 0..255 units."""
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    return (images.float() * std + mean) * 255


def test_backends_give_the_samplers_keys_and_the_same_pixels(shard_root):
    dali_cfg, torch_cfg = make_config(shard_root, "dali"), make_config(shard_root, "torch")
    dali_batches, torch_batches = run(dali_cfg), run(torch_cfg)
    expected = expected_keys(shard_root)
    assert len(expected) == 4
    assert [b.keys for b in dali_batches] == expected
    assert [b.keys for b in torch_batches] == expected
    diff = torch.cat([(to_pixels(d.images, dali_cfg) - to_pixels(t.images, torch_cfg)).abs()
                      for d, t in zip(dali_batches, torch_batches)])
    assert diff.max() <= 3.0 and diff.mean() < 0.5, (diff.max(), diff.mean())


@pytest.mark.parametrize("backend,dtype", [("torch", "float32"), ("dali", "bfloat16")])
def test_batch_layout_and_labels(shard_root, backend, dtype):
    batches = run(make_config(shard_root, backend, dtype=dtype))
    schema = load_schema()
    surveys = MIX_SURVEYS
    labels = pd.concat([pd.read_parquet(shard_root / s / "labels.parquet") for s in surveys]).set_index("key")
    num_absent = 0
    for batch in batches:
        assert batch.images.shape == (4 * 3, 3, 64, 64) and len(batch) == 12
        assert batch.images.dtype == getattr(torch, dtype)
        assert batch.features.shape == batch.votes.shape == batch.feature_mask.shape == (12, len(schema.names))
        assert batch.total_votes.shape == (12, len(schema.question_names))
        assert batch.feature_mask.dtype == torch.bool and batch.survey.dtype == torch.int64
        assert [surveys[s] for s in batch.survey.tolist()] == [k.split("_")[0] for k in batch.keys]
        rows = labels.loc[batch.keys]
        features = rows[schema.names].to_numpy(np.float32)
        assert np.array_equal(batch.feature_mask.numpy(), ~np.isnan(features))
        np.testing.assert_array_equal(batch.features.numpy(), np.nan_to_num(features, nan=0.0))
        votes = rows[[votes_column(f) for f in schema.names]].to_numpy(np.float32)
        np.testing.assert_array_equal(batch.votes.numpy(), np.nan_to_num(votes, nan=0.0))
        totals = rows[[total_votes_column(q) for q in schema.question_names]].to_numpy(np.float32)
        np.testing.assert_array_equal(batch.total_votes.numpy(), np.nan_to_num(totals, nan=0.0))
        num_absent += int((~batch.feature_mask).sum())
    assert num_absent > 0, "the mock surveys should lack some answers, or the mask test proves nothing"


def test_two_ranks_split_every_global_batch(shard_root):
    whole_cfg = make_config(shard_root, "torch", augment=AUGMENT)
    whole = run(whole_cfg)
    ranks = [run(make_config(shard_root, backend, augment=AUGMENT), rank=rank, world_size=2)
             for rank, backend in ((0, "dali"), (1, "torch"))]
    assert len(ranks[0]) == len(ranks[1]) == len(whole)
    for step, batch in enumerate(whole):
        keys0, keys1 = ranks[0][step].keys, ranks[1][step].keys
        assert len(keys0) == len(keys1) == 6 and not set(keys0) & set(keys1)
        assert keys0 + keys1 == batch.keys
        # A sample's augmentation belongs to its global position, whatever the world size.
        split = torch.cat([ranks[0][step].images, ranks[1][step].images])
        assert (to_pixels(split, whole_cfg) - to_pixels(batch.images, whole_cfg)).abs().mean() < 0.5
    assert [b.keys for b in ranks[1]] == expected_keys(shard_root, rank=1, world_size=2)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_worker_processes_change_nothing(shard_root, backend):
    in_process = run(make_config(shard_root, backend, augment=AUGMENT))
    workers = run(make_config(shard_root, backend, augment=AUGMENT, num_workers=2))
    assert [b.keys for b in workers] == [b.keys for b in in_process] == expected_keys(shard_root)
    for a, b in zip(in_process, workers):
        torch.testing.assert_close(a.images, b.images, rtol=0, atol=1e-5)


def test_resize_cache_reuses_resized_images_without_changing_a_pixel(shard_root):
    turns = AugmentConfig(enabled=True, rotation_step_deg=90.0, crop_scale=(1.0, 1.0))
    cfg = make_config(shard_root, "torch", augment=turns)
    uncached, cached = build_loader(cfg, MIX), build_loader(replace(cfg, resize_cache_mb=16), MIX)
    try:
        for _ in range(2):  # the second epoch reads samples the first one cached
            for a, b in zip(uncached, cached, strict=True):
                assert a.keys == b.keys
                torch.testing.assert_close(a.images, b.images, rtol=0, atol=1e-4)
        cache = cached._backend.cache
        assert 0 < len(cache.images) < 2 * len(cached) * MIX.global_batch_size  # reused, not re-read
    finally:
        uncached.close()
        cached.close()


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_resume_continues_with_the_remaining_batches(shard_root, backend):
    cfg = make_config(shard_root, backend, augment=AUGMENT)
    full = run(cfg)
    loader = build_loader(cfg, MIX)
    seen = []
    for batch in loader:
        seen.append(batch)
        if len(seen) == 2:
            break
    state = loader.state_dict()
    assert state["samples_consumed"] == 2 * MIX.global_batch_size and state["epoch"] == 0
    # The same loader picks up where it stopped...
    rest_same = list(loader)
    # ...and so does a fresh one restored from the state, through either entry point.
    fresh = build_loader(cfg, MIX)
    fresh.load_state_dict(state)
    rest_fresh = list(fresh)
    rest_arg = run(cfg, sampler_state=state)
    for rest in (rest_same, rest_fresh, rest_arg):
        assert [b.keys for b in seen + rest] == [b.keys for b in full]
        for a, b in zip(rest, full[2:]):
            torch.testing.assert_close(a.images, b.images, rtol=0, atol=1e-5)
    assert loader.sampler.epoch == 1 and loader.sampler.samples_consumed == 0
    assert len(loader) == 4
    next_epoch = list(loader)  # the DALI backend reuses its pipeline across the epoch boundary
    assert [b.keys for b in next_epoch] == expected_keys(shard_root, epoch=1)
    loader.close()
    fresh.close()


def _corrupt_copy(shard_root, tmp_path):
    """A copy of the shard root with one hst JPEG overwritten and one sdss shard truncated mid-sample."""
    root = tmp_path / "shards"
    shutil.copytree(shard_root, root)
    surveys = load_shard_root(root, list(MIX.ratios))
    first = {name: None for name in MIX.ratios}
    order = global_order({s.name: s.shard_counts for s in surveys}, MIX, 0)
    for s, shard, index in order.samples[:12]:
        first[surveys[s].name] = first[surveys[s].name] or (int(s), int(shard), int(index))
    s, shard, index = first["hst"]
    offset, _ = surveys[s].index[shard][index].members["jpg"]
    with open(surveys[s].paths[shard], "r+b") as f:
        f.seek(offset)
        f.write(b"\x00" * 32)
    bad = {(s, shard, index)}
    s, shard, index = first["sdss"]
    offset, _ = surveys[s].index[shard][index].members["jpg"]
    with open(surveys[s].paths[shard], "r+b") as f:
        f.truncate(offset + 100)
    bad |= {(s, shard, i) for i in range(index, surveys[s].shard_counts[shard])}
    return root, surveys, bad


def _replace(surveys, bad, ref) -> tuple[str, int]:
    """The documented rule: next index in the same shard, wrapping across the survey's shards.
    Returns the key read and the number of bad samples skipped on the way."""
    s, shard, index = ref
    skipped = 0
    while (s, shard, index) in bad:
        index, skipped = index + 1, skipped + 1
        if index == surveys[s].shard_counts[shard]:
            shard, index = (shard + 1) % len(surveys[s].paths), 0
    return surveys[s].key(shard, index), skipped


def test_bad_samples_are_replaced_counted_and_logged(shard_root, tmp_path, caplog):
    root, surveys, bad = _corrupt_copy(shard_root, tmp_path)
    clean = expected_keys(shard_root)
    order = global_order({s.name: s.shard_counts for s in surveys}, MIX, 0)
    walks = [_replace(surveys, bad, tuple(int(v) for v in ref)) for ref in order.samples]
    expected = [key for key, _ in walks]
    expected_errors = {name: sum(n for (key, n) in walks if key.startswith(name + "_")) for name in MIX_SURVEYS}
    assert expected_errors["hst"] >= 1 and expected_errors["sdss"] >= 2 and expected_errors["decals"] == 0
    results = {}
    for backend, workers in (("dali", 0), ("torch", 0), ("dali", 2), ("torch", 2)):
        caplog.clear()
        loader = build_loader(make_config(root, backend, max_error_rate=1.0, num_workers=workers), MIX)
        with caplog.at_level(logging.WARNING):
            results[backend, workers] = list(loader)
        # Counts come back from worker processes too; their log lines go to the workers' stderr.
        assert loader.errors == expected_errors
        loader.close()
        if workers == 0:
            bad_key = next(surveys[s].key(sh, i) for s, sh, i in bad if surveys[s].name == "hst")
            assert any(bad_key in r.message and "hst-train-" in r.message for r in caplog.records)
            assert any("sdss-train-" in r.message and "truncated" in r.message for r in caplog.records)
    for backend, batches in results.items():
        keys = [k for b in batches for k in b.keys]
        assert keys == expected, backend
        assert keys != [k for batch in clean for k in batch]
        for batch, clean_keys in zip(batches, clean):
            # Replacements come from the same survey: every batch keeps its exact composition.
            assert [k.split("_")[0] for k in batch.keys] == [k.split("_")[0] for k in clean_keys]
            assert [MIX_SURVEYS[i] for i in batch.survey.tolist()] == [k.split("_")[0] for k in batch.keys]


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_error_rate_above_threshold_stops_the_loader(shard_root, tmp_path, backend):
    root = tmp_path / "shards"
    shutil.copytree(shard_root, root)
    info = load_shard_root(root, ["hst"])[0]
    for shard, path in enumerate(info.paths[:-1]):  # every hst shard but the last is garbage
        with open(path, "r+b") as f:
            for entry in info.index[shard]:
                f.seek(entry.members["jpg"][0])
                f.write(b"garbage!")
    cfg = make_config(root, backend, max_error_rate=0.05, error_rate_min_reads=10)
    with pytest.raises(RuntimeError, match=r"survey 'hst'.*max_error_rate 5\.00%") as err:
        run(cfg)
    assert "error rate" in str(err.value)
    # A generous threshold lets the same data through, with the damage counted.
    loader = build_loader(replace(cfg, max_error_rate=1.0), MIX)
    assert len(list(loader)) == 4 and loader.errors["hst"] > 10
    loader.close()


def test_augmentation_is_applied_deterministic_and_the_same_in_both_backends(shard_root):
    plain = run(make_config(shard_root, "dali"))
    dali_cfg, torch_cfg = make_config(shard_root, "dali", augment=AUGMENT), make_config(shard_root, "torch",
                                                                                        augment=AUGMENT)
    first, second, torch_run = run(dali_cfg), run(dali_cfg), run(torch_cfg)
    for a, b, t, p in zip(first, second, torch_run, plain):
        assert a.keys == b.keys == t.keys == p.keys
        assert torch.equal(a.images, b.images)
        assert (to_pixels(a.images, dali_cfg) - to_pixels(p.images, dali_cfg)).abs().mean() > 5.0
        diff = (to_pixels(a.images, dali_cfg) - to_pixels(t.images, torch_cfg)).abs()
        assert diff.mean() < 0.5 and diff.max() < 5.0, (diff.mean(), diff.max())
    assert not torch.equal(first[0].images[:4], first[1].images[:4])


def test_draws_depend_only_on_seed_epoch_and_global_position():
    whole = draw_batch(AUGMENT, 0, 3, 5, 12, slice(0, 12))
    assert draw_batch(AUGMENT, 0, 3, 5, 12, slice(6, 12)) == whole[6:]
    assert draw_batch(AUGMENT, 0, 3, 6, 12, slice(0, 12)) != whole
    assert draw_batch(AUGMENT, 1, 3, 5, 12, slice(0, 12)) != whole
    assert len({d.angle_deg for d in whole}) == 12
    assert draw_batch(AugmentConfig(), 0, 3, 5, 12, slice(0, 4)) == [SampleDraw()] * 4


def test_plans_degrade_only_listed_surveys_and_identity_when_off():
    draw = replace(SampleDraw(), degrade_u=0.0, resample_factor=2.0, noise_std=3.0, psf_sigma_px=1.0)
    cfg = AugmentConfig(enabled=True, degrade_prob=1.0, degrade_surveys=("hst",))
    hst, sdss = make_plan(cfg, draw, (64, 64), 64, "hst"), make_plan(cfg, draw, (64, 64), 64, "sdss")
    assert hst.degrade and hst.small_hw == (32, 32) and hst.noise.shape == (32, 32, 3)
    assert 2.5 < hst.noise.std() < 3.5
    assert not sdss.degrade and sdss.noise is None
    off = make_plan(AugmentConfig(), draw, (64, 64), 64, "hst")
    assert not off.degrade and off.prefilter_sigma == 0
    np.testing.assert_array_equal(off.matrix, np.eye(2, 3))
    mild = make_plan(AugmentConfig(), draw, (256, 256), 224, "hst")
    assert mild.prefilter_sigma == 0 and mild.matrix[0, 0] == pytest.approx(256 / 224)  # near-identity blur skipped
    shrink = make_plan(AugmentConfig(), draw, (256, 256), 112, "hst")
    assert shrink.prefilter_sigma == pytest.approx((((256 / 112) ** 2 - 1) / 6) ** 0.5) and shrink.prefilter_sigma > 0.35


def test_configs_load_from_yaml_mappings():
    cfg = from_dict(LoaderConfig, {"backend": "torch", "dtype": "bfloat16", "augment": {
        "enabled": True, "degrade_prob": 0.3, "degrade_surveys": ["hst"], "crop_scale": [0.5, 1.0]}})
    assert cfg.augment.degrade_surveys == ("hst",) and cfg.augment.crop_scale == (0.5, 1.0)
    with pytest.raises(ValueError, match="unknown key"):
        from_dict(LoaderConfig, {"augment": {"rotate": 10}})
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentConfig(crop_scale=(0.9, 0.5))
    with pytest.raises(ValueError, match="backend"):
        LoaderConfig(backend="jax")


def test_check_image_catches_damage_before_decoding(shard_root):
    info = load_shard_root(shard_root, ["sdss"])[0]
    offset, size = info.index[0][0].members["jpg"]
    with open(info.paths[0], "rb") as f:
        f.seek(offset)
        data = f.read(size)
    assert check_image(data, "jpg") == (64, 64)
    for damaged in (data[: size // 2], b"\x00" * 16 + data[16:], b"not an image at all"):
        with pytest.raises(CorruptSample):
            check_image(damaged, "jpg")
    # PIL names the in-memory file it could not identify; the message (a log line, a reject) keeps no address.
    with pytest.raises(CorruptSample, match="cannot identify image file") as caught:
        check_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "png")
    assert "0x" not in str(caught.value) and "BytesIO object>" in str(caught.value)


def _pil_header(data: bytes) -> tuple[int, int] | None:
    """PIL's verdict: (height, width) of a readable 8-bit RGB or grey JPEG header, else None."""
    import io

    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as image:
            return (image.height, image.width) if image.mode in ("RGB", "L") and image.format == "JPEG" else None
    except Exception:  # noqa: BLE001 - any failure is a refusal
        return None


def test_jpeg_header_walk_agrees_with_pil():
    import io

    from PIL import Image
    rng = np.random.default_rng(0)
    samples = []
    for mode, size, kwargs in [("RGB", (64, 48), {}), ("L", (31, 77), {}), ("RGB", (200, 120), {"progressive": True}),
                               ("RGB", (17, 9), {"quality": 30, "subsampling": 0}), ("CMYK", (20, 20), {}),
                               ("RGB", (40, 40), {"exif": b"Exif\x00\x00" + bytes(300)})]:
        buf = io.BytesIO()
        pixels = rng.integers(0, 255, (size[1], size[0], len(mode) if mode != "L" else 1), dtype=np.uint8)
        Image.fromarray(pixels.squeeze(), mode).save(buf, format="JPEG", **kwargs)
        samples.append(buf.getvalue())
    damaged = []
    for data in samples[:4]:
        sof = data.index(b"\xff\xc0") if b"\xff\xc0" in data else data.index(b"\xff\xc2")
        damaged += [data[:sof + 5] + data[-2:],  # the frame header cut short
                    data[:2] + b"\x00" + data[3:],  # no marker after SOI
                    data[:sof + 9] + b"\x04" + data[sof + 10:],  # 4 components announced, 3 listed
                    data[:sof] + data[sof + 2 + int.from_bytes(data[sof + 2:sof + 4], "big"):]]  # no frame header
    for data in samples + damaged:
        expected = _pil_header(data)
        if expected is None:
            with pytest.raises(CorruptSample):
                check_image(data, "jpg")
        else:
            assert check_image(data, "jpg") == expected


@pytest.mark.gpu
def test_dali_gpu_decode_matches_cpu(shard_root):
    pytest.importorskip("nvidia.dali", reason="DALI (the gpu extra, a ~420 MB wheel) is not installed: the torch "
                        "backend serves the GPU (tests/test_gpu_path.py)")
    cpu_cfg = make_config(shard_root, "dali", augment=AUGMENT)
    cpu, gpu = run(cpu_cfg), run(replace(cpu_cfg, device="gpu"))
    for a, b in zip(cpu, gpu):
        assert a.keys == b.keys and b.images.is_cuda
        assert (to_pixels(a.images, cpu_cfg) - to_pixels(b.images.cpu(), cpu_cfg)).abs().mean() < 1.0
