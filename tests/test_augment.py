"""Augmentation geometry and filters, without shards: what a morphology label may and may not see change."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.ndimage import correlate1d

from loaders.augment import (AugmentConfig, SampleDraw, adjust, apply_plan, draw_batch, gaussian_blur, plain_turn,
                             apply_turn, make_plan)


def _blob(size: int = 256, sigma_x: float = 24.0, sigma_y: float = 24.0) -> torch.Tensor:
    """A centred Gaussian galaxy on black sky, (3, size, size) in 0..255."""
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5 - size / 2, torch.arange(size) + 0.5 - size / 2, indexing="ij")
    light = 250.0 * torch.exp(-0.5 * ((xs / sigma_x) ** 2 + (ys / sigma_y) ** 2))
    return light.expand(3, size, size).clone()


def _axis_ratio(image: torch.Tensor) -> float:
    """b/a from the second moments of the light: 1 for a round galaxy, whatever its size or position."""
    light = image.mean(dim=0).double()
    light = light - light.min()  # contrast jitter lifts the sky: only the galaxy's light has a shape
    ys, xs = torch.meshgrid(torch.arange(light.shape[0]), torch.arange(light.shape[1]), indexing="ij")
    total = light.sum()
    mx, my = (light * xs).sum() / total, (light * ys).sum() / total
    cxx, cyy = (light * (xs - mx) ** 2).sum() / total, (light * (ys - my) ** 2).sum() / total
    cxy = (light * (xs - mx) * (ys - my)).sum() / total
    eig = torch.linalg.eigvalsh(torch.tensor([[cxx, cxy], [cxy, cyy]]))
    return float(torch.sqrt(eig[0] / eig[1]))


def test_default_augmentation_keeps_a_round_galaxy_round():
    # The axis ratio is a label (how-rounded, edge-on): no default augmentation may stretch one axis.
    cfg = AugmentConfig(enabled=True)
    image = _blob()
    ratios = [_axis_ratio(apply_plan(image, make_plan(cfg, draw, (256, 256), 64, "sdss"), 64))
              for draw in draw_batch(cfg, seed=0, epoch=0, batch_index=0, global_batch_size=64, positions=slice(0, 64))]
    assert min(ratios) > 0.97, sorted(ratios)[:5]


def test_default_augmentation_keeps_an_elongated_galaxy_s_axis_ratio():
    cfg = AugmentConfig(enabled=True)
    image = _blob(sigma_x=12.0, sigma_y=5.0)
    expected = _axis_ratio(apply_plan(image, make_plan(AugmentConfig(), SampleDraw(), (256, 256), 64, "sdss"), 64))
    ratios = [_axis_ratio(apply_plan(image, make_plan(cfg, draw, (256, 256), 64, "sdss"), 64))
              for draw in draw_batch(cfg, seed=1, epoch=0, batch_index=0, global_batch_size=32, positions=slice(0, 32))]
    assert max(abs(r - expected) for r in ratios) < 0.03, (expected, ratios)


def test_right_angle_rotations_are_exact_pixel_permutations():
    cfg = AugmentConfig(enabled=True, rotation_step_deg=90.0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                        brightness=0.0, contrast=0.0)
    image = torch.rand(3, 64, 64) * 255
    draws = draw_batch(cfg, seed=0, epoch=0, batch_index=0, global_batch_size=32, positions=slice(0, 32))
    assert {d.angle_deg % 360 for d in draws} == {0.0, 90.0, 180.0, 270.0}
    for draw in draws:
        out = apply_plan(image, make_plan(cfg, draw, (64, 64), 64, "hst"), 64)
        # Output pixel -> flipped about the window centre -> rotated into the image: the flip of the rotation.
        expected = torch.rot90(image, round(draw.angle_deg / 90) % 4, dims=(1, 2))
        expected = expected.flip(2) if draw.hflip else expected
        expected = expected.flip(1) if draw.vflip else expected
        assert torch.allclose(out, expected, atol=1e-3), draw


def test_rotation_step_rounds_the_same_draws():
    # Rounding keeps every other column: a run that turns right angles on sees the same flips and crops.
    cont = draw_batch(AugmentConfig(enabled=True), 3, 1, 2, 16, slice(0, 16))
    step = draw_batch(AugmentConfig(enabled=True, rotation_step_deg=90.0), 3, 1, 2, 16, slice(0, 16))
    assert [d.angle_deg for d in step] == [90.0 * round(d.angle_deg / 90.0) for d in cont]
    assert [(d.hflip, d.crop_u, d.brightness) for d in step] == [(d.hflip, d.crop_u, d.brightness) for d in cont]
    with pytest.raises(ValueError, match="rotation_step_deg"):
        AugmentConfig(rotation_step_deg=-90.0)


@pytest.mark.parametrize("sigma", [0.4, 1.58, 3.0])
def test_gaussian_blur_is_the_reflect_101_separable_kernel(sigma):
    image = torch.rand(3, 37, 50) * 255
    radius = int(np.ceil(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    # scipy's "mirror" mode is reflect-101 (d c b | a b c d | c b a), DALI's border for its blur.
    expected = correlate1d(correlate1d(image.double().numpy(), kernel, axis=1, mode="mirror"), kernel, axis=2,
                           mode="mirror")
    assert np.allclose(gaussian_blur(image, sigma).numpy(), expected, atol=1e-3)


def test_plain_turn_reorders_the_plain_resize_exactly_and_only_for_right_angles():
    image = torch.rand(3, 96, 96) * 255
    plain = apply_plan(image, make_plan(AugmentConfig(), SampleDraw(), (96, 96), 32, "sdss"), 32)
    turns = AugmentConfig(enabled=True, rotation_step_deg=90.0, crop_scale=(1.0, 1.0))
    for draw in draw_batch(turns, seed=2, epoch=0, batch_index=0, global_batch_size=16, positions=slice(0, 16)):
        plan = make_plan(turns, draw, (96, 96), 32, "sdss")
        turn = plain_turn(plan, 32)
        assert torch.allclose(adjust(apply_turn(plain, turn), plan), apply_plan(image, plan, 32), atol=1e-3)
    # Any other angle, a crop or a degradation samples elsewhere: no reuse.
    for cfg in (AugmentConfig(enabled=True, crop_scale=(1.0, 1.0)),
                AugmentConfig(enabled=True, rotation_step_deg=90.0, crop_scale=(0.8, 0.8)),
                AugmentConfig(enabled=True, rotation_step_deg=90.0, crop_scale=(1.0, 1.0), degrade_prob=1.0)):
        draws = draw_batch(cfg, seed=2, epoch=0, batch_index=0, global_batch_size=8, positions=slice(0, 8))
        assert all(plain_turn(make_plan(cfg, d, (96, 96), 32, "sdss"), 32) is None for d in draws), cfg


def _scipy_warp(image: torch.Tensor, matrix: np.ndarray, out: int) -> np.ndarray:
    """Bilinear sampling with clamped borders at the output pixel centres' source positions (scipy)."""
    from scipy.ndimage import map_coordinates
    ys, xs = np.meshgrid(np.arange(out) + 0.5, np.arange(out) + 0.5, indexing="ij")
    src_x = matrix[0, 0] * xs + matrix[0, 1] * ys + matrix[0, 2] - 0.5  # edge coordinates -> pixel indices
    src_y = matrix[1, 0] * xs + matrix[1, 1] * ys + matrix[1, 2] - 0.5
    return np.stack([map_coordinates(c.double().numpy(), [src_y, src_x], order=1, mode="nearest") for c in image])


@pytest.mark.parametrize("case", ["down", "up", "hflip", "vflip", "both", "crop", "rotate", "rotate_back", "transpose"])
def test_warp_affine_samples_where_scipy_does(case):
    from loaders.augment import warp_affine
    h, w, out = 50, 40, 32
    image = torch.rand(3, h, w) * 255
    sx, sy = w / out, h / out
    matrix = {"down": [[sx, 0, 0], [0, sy, 0]], "up": [[w / 64, 0, 0], [0, h / 64, 0]],
              "hflip": [[-sx, 0, w], [0, sy, 0]], "vflip": [[sx, 0, 0], [0, -sy, h]],
              "both": [[-sx, 0, w], [0, -sy, h]], "crop": [[0.8 * sx, 0, 3.3], [0, 0.8 * sy, 1.7]],
              "rotate": [[0, -sx, w], [sy, 0, 0]], "rotate_back": [[0, sx, 0], [-sy, 0, h]],
              "transpose": [[0, sx, 0], [sy, 0, 0]]}[case]
    size = 64 if case == "up" else out
    matrix = np.array(matrix, dtype=np.float64)
    got = warp_affine(image, matrix, (size, size)).numpy()
    np.testing.assert_allclose(got, _scipy_warp(image, matrix, size), atol=2e-3)


def test_spectral_norm_is_numpy_s():
    from loaders.augment import _spectral_norm
    rng = np.random.default_rng(0)
    for m in [*rng.normal(size=(200, 2, 2)), np.eye(2), np.zeros((2, 2)), np.array([[0.0, -2.0], [1.5, 0.0]])]:
        assert _spectral_norm(m) == pytest.approx(np.linalg.norm(m, 2), rel=1e-9, abs=1e-12)


def test_center_range_pulls_the_crop_window_towards_the_cutout_centre():
    # A small window anywhere in an HST cutout mostly sees sky; center_range keeps it on the (centred) galaxy.
    local = AugmentConfig(enabled=True, crop_scale=(0.05, 0.3))
    draws = draw_batch(local, seed=2, epoch=0, batch_index=0, global_batch_size=64, positions=slice(0, 64))
    assert draw_batch(replace(local, center_range=0.0), 2, 0, 0, 64, slice(0, 64)) == draws  # no other draw moves

    def window_centres(center_range: float) -> np.ndarray:
        cfg = replace(local, center_range=center_range)
        plans = [make_plan(cfg, d, (256, 256), 32, "hst") for d in draws]
        # Where the output's centre samples the image (a plan's matrix reads the part of the image it cut out).
        return np.array([p.matrix.astype(np.float64) @ [16.0, 16.0, 1.0] + (p.crop[:2] if p.crop else 0)
                         for p in plans])

    anywhere, centred, near = window_centres(1.0), window_centres(0.0), window_centres(0.25)
    np.testing.assert_allclose(centred, 128.0, atol=1e-3)
    # Offsets scale by the range: the same draws, a quarter of the way out.
    np.testing.assert_allclose(near - 128.0, 0.25 * (anywhere - 128.0), atol=1e-3)
    assert np.abs(anywhere - 128.0).max() > 60  # the default still reaches the cutout's edges
    with pytest.raises(ValueError, match="center_range"):
        AugmentConfig(center_range=1.5)


def test_channel_gain_scales_each_band_by_its_own_draw_and_moves_no_other_draw():
    cfg = AugmentConfig(enabled=True, brightness=0.0, contrast=0.0, channel_gain=0.3, rotation_step_deg=90.0,
                        crop_scale=(1.0, 1.0))
    draws = draw_batch(cfg, seed=4, epoch=0, batch_index=1, global_batch_size=16, positions=slice(0, 16))
    plain = draw_batch(replace(cfg, channel_gain=0.0), 4, 0, 1, 16, slice(0, 16))
    assert [replace(d, channel_gain=(1.0, 1.0, 1.0)) for d in draws] == plain
    gains = np.array([d.channel_gain for d in draws])
    assert gains.min() >= 0.7 and gains.max() <= 1.3 and gains.std(axis=1).min() > 0  # bands differ
    image = torch.full((3, 32, 32), 100.0)
    for draw, gain in zip(draws, gains):
        out = apply_plan(image, make_plan(cfg, draw, (32, 32), 32, "sdss"), 32)
        np.testing.assert_allclose(out.mean(dim=(1, 2)).numpy(), 100.0 * gain, rtol=1e-5)
