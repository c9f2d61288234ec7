"""Multi-crop views: config, seeded draws, both backends' views, world-size independence, Batch slicing."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from loaders import augment
from loaders.augment import AugmentConfig, SampleDraw, apply_plan, draw_batch, make_plan
from loaders.batch import Batch
from loaders.loader import LoaderConfig, build_loader
from loaders.sampler import MixConfig, global_order, rank_batch_indices
from loaders.shards import load_shard_root
from loaders.views import CropSet, LocalCrops, ViewsConfig, draw_views, plan_views
from sharding.config import from_dict

MIX = MixConfig(ratios="sdss=0.34,decals=0.33,hst=0.33", global_batch_size=12, epoch_samples=24, seed=0)
VIEWS = ViewsConfig(enabled=True, global_crops=CropSet(count=2, size=40, degrade_prob=(1.0, 0.0),
                                                         degrade_pixels="view"),
                    # resize paths in DALI, with the colour jitter folded into its normalisation
                    local_crops=LocalCrops(count=3, size=24, rotation_step_deg=90, brightness=0.2, contrast=0.2,
                                           channel_gain=0.3))


def make_config(root, backend, **overrides) -> LoaderConfig:
    return LoaderConfig(**{"shard_root": str(root), "backend": backend, "image_size": 64, "num_workers": 0,
                           "views": VIEWS, **overrides})


def run(cfg, **kwargs) -> list[Batch]:
    loader = build_loader(cfg, MIX, **kwargs)
    try:
        return list(loader)
    finally:
        loader.close()


def to_pixels(images: torch.Tensor, cfg: LoaderConfig) -> torch.Tensor:
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    return (images.float() * std + mean) * 255


def test_views_config_loads_from_yaml_and_checks_its_values():
    cfg = from_dict(LoaderConfig, {"views": {"enabled": True, "global_crops": {"size": 64, "degrade_prob": [0.5]},
                                             "local_crops": {"count": 4, "size": 32, "center_range": 0.25}}})
    views = cfg.views
    assert views.global_crops.scale == (0.32, 1.0) and views.global_crops.degrade_prob == (0.5,)
    # A partial local_crops keeps the local defaults, not the global ones.
    assert views.local_crops.scale == (0.05, 0.32) and views.local_crops.degrade_prob == (0.5,)
    assert views.sizes == [64, 64, 32, 32, 32, 32] and views.num_global_views == 2 and views.num_views == 6
    assert [a.center_range for a in views.augments()] == [1.0] * 2 + [0.25] * 4
    # Colours and surface brightness are kept unless asked otherwise.
    assert all(a.brightness == 0 and a.contrast == 0 and a.channel_gain == 0 for a in views.augments())
    assert LoaderConfig().views.enabled is False and LoaderConfig().views.sizes == []
    jittered = from_dict(LoaderConfig, {"views": {"enabled": True, "global_crops": {"channel_gain": 0.2}}}).views
    assert [a.channel_gain for a in jittered.augments()] == [0.2] * 2 + [0.0] * 8
    with pytest.raises(ValueError, match="unknown key.*hue"):
        from_dict(LoaderConfig, {"views": {"global_crops": {"hue": 0.2}}})
    with pytest.raises(ValueError, match="channel_gain must be < 1"):
        CropSet(channel_gain=1.0)
    with pytest.raises(ValueError, match="views crop set: scale"):
        CropSet(scale=(0.9, 0.5))
    with pytest.raises(ValueError, match="degrade_prob"):
        LocalCrops(degrade_prob=(1.5,))
    with pytest.raises(ValueError, match="global_crops.count"):
        ViewsConfig(enabled=True, global_crops=CropSet(count=0))


def test_view_draws_depend_only_on_seed_epoch_batch_and_view():
    whole = draw_views(VIEWS, 0, 2, 5, 12, slice(0, 12))
    assert len(whole) == 5 and all(len(v) == 12 for v in whole)
    assert [v[6:] for v in whole] == draw_views(VIEWS, 0, 2, 5, 12, slice(6, 12))  # rank 1 of 2 slices them
    assert draw_views(VIEWS, 0, 2, 6, 12, slice(0, 12)) != whole
    assert len({d.crop_u for v in whole for d in v}) == 5 * 12  # every view draws its own numbers
    # Views have their own stream: not the single-image augmentation's draws.
    assert draw_batch(VIEWS.augments()[0], 0, 2, 5, 12, slice(0, 12)) != whole[0]
    plans = [plan_views(VIEWS, whole, i, (64, 64), "sdss") for i in range(12)]
    assert all(p[0].degrade and not p[1].degrade for p in plans)  # per-view probabilities 1.0 and 0.0
    assert [p.matrix.shape for p in plans[0]] == [(2, 3)] * 5


def test_the_mix_of_views_exercises_every_resampling_path():
    """The loader tests below compare backends on these views: they must hold DALI's resize, transposed resize,
    warp, cropped prefilter and cropped degradation paths."""
    plans = [p for b in range(2) for draws in [draw_views(VIEWS, 0, 0, b, 12, slice(0, 12))]
             for i in range(12) for p in plan_views(VIEWS, draws, i, (64, 64), "sdss")]
    turns = [(p.matrix[0, 1] == 0, p.matrix[0, 0] == 0) for p in plans]
    assert sum(a for a, _ in turns) and sum(t for _, t in turns) and sum(not (a or t) for a, t in turns)
    assert sum(p.crop is not None and p.prefilter_sigma > 0 and not p.degrade for p in plans) >= 3
    assert sum(p.crop is not None and p.degrade for p in plans) >= 3 and sum(p.degrade for p in plans) >= 10


@pytest.mark.parametrize("degrade_prob,resample_factor", [(0.0, 1.0), (1.0, 1.0), (1.0, 1.5)])
def test_blurring_and_degrading_only_the_part_a_crop_reads_changes_no_pixel(monkeypatch, degrade_prob,
                                                                          resample_factor):
    image = torch.rand(3, 96, 80) * 255
    cfg = replace(LocalCrops(rotation_deg=30.0).augment(0), degrade_prob=degrade_prob, noise_std=(0.0, 0.0))
    draws = [SampleDraw(angle_deg=17.0 + 40 * u, crop_scale=0.2, crop_u=u, crop_v=1 - u, degrade_u=0.0,
                        psf_sigma_px=0.5, resample_factor=resample_factor) for u in np.linspace(0.0, 1.0, 5)]
    cropped = [make_plan(cfg, draw, (96, 80), 16, "sdss") for draw in draws]
    monkeypatch.setattr(augment, "read_window", lambda *args: None)  # the same plans on the whole image
    whole = [make_plan(cfg, draw, (96, 80), 16, "sdss") for draw in draws]
    for a, b in zip(cropped, whole):
        assert a.crop is not None and b.crop is None and a.degrade == b.degrade == (degrade_prob == 1.0)
        assert a.prefilter_sigma == b.prefilter_sigma > 0
        torch.testing.assert_close(apply_plan(image, a, 16), apply_plan(image, b, 16), rtol=0, atol=2e-3)


def _added_blur_variance(cfg: AugmentConfig, crop_scale: float) -> float:
    """Output px^2 a degradation (PSF sigma 2, no coarser grid, no noise) adds to a round Gaussian galaxy (sigma 16
    image px) at the centre of a 256 px image, cut to a centred 64 px view from `crop_scale` of its area: measured
    from the view's second moments, degraded against not."""
    yy, xx = np.mgrid[0:256, 0:256] + 0.5
    image = torch.from_numpy(np.exp(-((xx - 128) ** 2 + (yy - 128) ** 2) / (2 * 16.0 ** 2)) * 200).float()
    image = image.expand(3, 256, 256).contiguous()
    draw = SampleDraw(crop_scale=crop_scale, psf_sigma_px=2.0, resample_factor=1.0, noise_std=0.0, degrade_u=0.0)

    def variance(degrade_prob: float) -> float:
        view = apply_plan(image, make_plan(replace(cfg, degrade_prob=degrade_prob), draw, (256, 256), 64, "sdss"), 64)
        light = view[0].double() / view[0].sum()
        y, x = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
        return float((light * ((x - (light * x).sum()) ** 2 + (y - (light * y).sum()) ** 2)).sum() / 2)
    return variance(1.0) - variance(0.0)


def test_degradation_in_view_pixels_blurs_every_crop_size_alike_and_in_image_pixels_shrinks_with_the_view():
    cfg = AugmentConfig(enabled=True, rotation_deg=0.0, hflip_prob=0.0, vflip_prob=0.0, crop_scale=(0.05, 1.0),
                        psf_sigma_px=(2.0, 2.0), noise_std=(0.0, 0.0))
    for scale, image_px_per_view_px in ((1.0, 4.0), (0.25, 2.0)):
        # A Gaussian PSF adds its variance: 2^2 view px^2, or (2 / image px per view px)^2 counted in the image's.
        assert _added_blur_variance(replace(cfg, degrade_pixels="view"), scale) == pytest.approx(4.0, rel=0.05)
        assert _added_blur_variance(cfg, scale) == pytest.approx((2.0 / image_px_per_view_px) ** 2, rel=0.05,
                                                                 abs=0.02)
    with pytest.raises(ValueError, match="degrade_pixels"):
        AugmentConfig(degrade_pixels="arcsec")


def test_both_backends_give_the_same_views(shard_root):
    dali_cfg, torch_cfg = make_config(shard_root, "dali"), make_config(shard_root, "torch")
    dali_batches, torch_batches = run(dali_cfg), run(torch_cfg)
    surveys = load_shard_root(shard_root, list(MIX.ratios))
    order = global_order({s.name: s.shard_counts for s in surveys}, MIX, 0)
    assert len(dali_batches) == len(torch_batches) == order.num_batches == 2
    for b, (d, t) in enumerate(zip(dali_batches, torch_batches)):
        expected = [surveys[s].key(sh, i) for s, sh, i in order.samples[rank_batch_indices(order, 0, 1, b)]]
        assert d.keys == t.keys == expected
        assert d.num_global_views == t.num_global_views == 2 and len(d.views) == len(t.views) == 5
        assert [tuple(v.shape) for v in d.views] == [(12, 3, 40, 40)] * 2 + [(12, 3, 24, 24)] * 3
        assert d.images is d.views[0] and t.images is t.views[0]
        for dv, tv in zip(d.views, t.views):
            diff = (to_pixels(dv, dali_cfg) - to_pixels(tv, torch_cfg)).abs()
            assert diff.mean() < 0.5 and diff.max() < 5.0, (diff.mean(), diff.max())
        # Views of one sample differ (own crops), and labels are the plain loader's.
        assert (d.views[0] - d.views[1]).abs().mean() > 0.1
    plain = run(make_config(shard_root, "torch", views=ViewsConfig()))
    assert plain[0].views is None and plain[0].num_global_views == 0
    torch.testing.assert_close(plain[0].features, torch_batches[0].features, rtol=0, atol=0)


def test_views_are_the_same_on_any_world_size(shard_root):
    cfg = make_config(shard_root, "torch")
    whole = run(cfg)
    ranks = [run(cfg, rank=rank, world_size=2) for rank in (0, 1)]
    dali_rank = run(make_config(shard_root, "dali"), rank=1, world_size=2)
    for step, batch in enumerate(whole):
        assert ranks[0][step].keys + ranks[1][step].keys == batch.keys == ranks[0][step].keys + dali_rank[step].keys
        for v, view in enumerate(batch.views):
            split = torch.cat([ranks[0][step].views[v], ranks[1][step].views[v]])
            torch.testing.assert_close(split, view, rtol=0, atol=1e-4)
            diff = (to_pixels(dali_rank[step].views[v], cfg) - to_pixels(view[6:], cfg)).abs()
            assert diff.mean() < 0.5 and diff.max() < 5.0


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_views_with_workers_bf16_and_resume(shard_root, backend):
    cfg = make_config(shard_root, backend, dtype="bfloat16")
    full = run(cfg)
    assert all(v.dtype == torch.bfloat16 for v in full[0].views)
    workers = run(replace(cfg, num_workers=2))
    resumed = run(cfg, sampler_state={"epoch": 0, "samples_consumed": MIX.global_batch_size,
                                      "global_batch_size": MIX.global_batch_size})
    for other in (workers[1], resumed[0]):
        assert other.keys == full[1].keys
        for a, b in zip(other.views, full[1].views):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_batch_slice_and_to_carry_views():
    n = 4
    views = [torch.randn(n, 3, 8, 8), torch.randn(n, 3, 8, 8), torch.randn(n, 3, 4, 4)]
    batch = Batch(views[0], torch.rand(n, 26), torch.ones(n, 26, dtype=torch.bool), torch.rand(n, 26),
                  torch.rand(n, 9), torch.arange(n), list("abcd"), views, 2)
    part = batch.slice(slice(1, 3))
    assert part.keys == ["b", "c"] and part.num_global_views == 2 and len(part.views) == 3
    assert part.images is part.views[0] and torch.equal(part.views[2], views[2][1:3])
    moved = batch.to("cpu")
    assert moved.images is moved.views[0] and moved.num_global_views == 2
    plain = Batch(*(getattr(batch, f) for f in ("images", "features", "feature_mask", "votes", "total_votes",
                                                 "survey", "keys")))
    assert plain.slice(slice(0, 2)).views is None and plain.to("cpu").num_global_views == 0


def test_augment_draws_unchanged_by_the_stream_argument():
    cfg = AugmentConfig(enabled=True)
    assert draw_batch(cfg, 0, 1, 2, 8, slice(0, 8)) == draw_batch(cfg, 0, 1, 2, 8, slice(0, 8), stream=(0x6175676D,))
    assert np.isfinite([d.angle_deg for d in draw_batch(cfg, 0, 1, 2, 8, slice(0, 8))]).all()


@pytest.mark.gpu
def test_dali_gpu_views_match_cpu(shard_root):
    pytest.importorskip("nvidia.dali", reason="DALI (the gpu extra) is not installed")
    cpu_cfg = make_config(shard_root, "dali")
    cpu, gpu = run(cpu_cfg), run(replace(cpu_cfg, device="gpu"))
    for a, b in zip(cpu, gpu):
        assert a.keys == b.keys and all(v.is_cuda for v in b.views) and b.images is b.views[0]
        for va, vb in zip(a.views, b.views):
            assert (to_pixels(va, cpu_cfg) - to_pixels(vb.cpu(), cpu_cfg)).abs().mean() < 1.0
