import math

import pytest
import torch

from monai_pld.augment import DiffSiameseAugment


def _images(n, channels=3, size=16, seed=0):
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def test_same_seed_and_groups_reproducible_and_global_rng_untouched():
    x, groups = _images(6), torch.tensor([0, 1, 1, 2, 0, 3])
    state = torch.get_rng_state()
    a = DiffSiameseAugment()(x, seed=5, groups=groups)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a, DiffSiameseAugment()(x, seed=5, groups=groups))
    assert not torch.allclose(a, DiffSiameseAugment()(x, seed=6, groups=groups))


def test_siamese_real_and_synthetic_get_the_same_transform_per_class():
    prototypes = _images(4)
    real_labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3])
    syn_labels = torch.tensor([2, 0, 1, 1])  # fewer per class, another order, class 3 missing (smaller id range)
    aug = DiffSiameseAugment()
    for seed in range(5):
        real = aug(prototypes[real_labels], seed=seed, groups=real_labels)
        syn = aug(prototypes[syn_labels], seed=seed, groups=syn_labels)
        for c in range(3):
            same_class = syn[syn_labels == c][:1]
            assert torch.allclose(real[real_labels == c], same_class.expand_as(real[real_labels == c]), atol=1e-6)


def test_different_classes_can_get_different_transforms():
    x = _images(1).expand(12, -1, -1, -1)
    out = DiffSiameseAugment()(x, seed=0, groups=torch.arange(12))
    distinct = {tuple(o.flatten().round(decimals=4).tolist()) for o in out}
    assert len(distinct) > 6


def test_no_groups_means_per_sample_variety():
    x = _images(1).expand(32, -1, -1, -1)
    out = DiffSiameseAugment()(x, seed=3)
    distinct = {tuple(o.flatten().round(decimals=4).tolist()) for o in out}
    assert len(distinct) > 20


def test_gradient_flows_to_the_input_for_every_family():
    for strategy in ("color", "crop", "cutout", "flip", "scale", "rotate", "color_crop_cutout_flip_scale_rotate"):
        x = _images(8).requires_grad_()
        DiffSiameseAugment(strategy)(x, seed=1, groups=torch.arange(8) % 3).pow(2).sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0, strategy


def test_flip_reverses_the_width_axis():
    x = torch.randn(3, 2, 5, 7)
    assert torch.equal(DiffSiameseAugment("flip", prob_flip=1.0)(x, seed=0), x.flip(3))
    assert torch.equal(DiffSiameseAugment("flip", prob_flip=0.0)(x, seed=0), x)


def test_crop_is_a_whole_pixel_shift_with_zero_fill():
    x = torch.rand(16, 2, 16, 16) + 1  # strictly positive, so zeros can only come from the fill
    out = DiffSiameseAugment("crop", ratio_crop_pad=0.125)(x, seed=4)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))  # largest shift int(0.125 * 16 + 0.5) = 2
    shifts = []
    for i in range(len(x)):
        matches = [
            (r, c)
            for r in range(-2, 3)
            for c in range(-2, 3)
            if torch.equal(out[i], padded[i, :, 2 + r : 18 + r, 2 + c : 18 + c])  # out[y, x] = x[y + r, x + c]
        ]
        assert len(matches) == 1, f"sample {i} is not a whole-pixel shift of at most 2 pixels with zero fill"
        shifts.append(matches[0])
    assert len(set(shifts)) > 3


def test_cutout_zeroes_one_square_in_every_channel():
    x = torch.ones(32, 3, 12, 12)
    out = DiffSiameseAugment("cutout", ratio_cutout=0.5)(x, seed=2)
    full_squares = 0
    for o in out:
        zero = o == 0
        assert torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2])
        rows, cols = zero[0].any(1).nonzero().squeeze(1), zero[0].any(0).nonzero().squeeze(1)
        assert 0 < len(rows) <= 6 and 0 < len(cols) <= 6  # side int(0.5 * 12 + 0.5) = 6, clipped at borders
        assert int(zero[0].sum()) == len(rows) * len(cols)  # one axis-aligned rectangle
        assert torch.equal(rows, torch.arange(int(rows[0]), int(rows[0]) + len(rows)))
        assert torch.equal(cols, torch.arange(int(cols[0]), int(cols[0]) + len(cols)))
        full_squares += len(rows) == 6 and len(cols) == 6
    assert full_squares > 0


def test_identity_scale_and_rotation_return_the_input():
    x = _images(4)
    assert torch.allclose(DiffSiameseAugment("scale", ratio_scale=1.0)(x, seed=0), x, atol=1e-5)
    assert torch.allclose(DiffSiameseAugment("rotate", ratio_rotate=0.0)(x, seed=0), x, atol=1e-5)
    assert not torch.allclose(DiffSiameseAugment("scale")(x, seed=0), x, atol=1e-2)
    assert not torch.allclose(DiffSiameseAugment("rotate")(x, seed=0), x, atol=1e-2)


def test_rotation_is_a_rotation_about_the_centre():
    # the public draw never hits exactly 90 degrees, so apply the family with a chosen angle
    x = _images(2, channels=1, size=9)
    quarter = DiffSiameseAugment("rotate")._rotate(x, {"angle": torch.full((2,), math.pi / 2)})
    assert torch.allclose(quarter, torch.rot90(x, 1, (2, 3)), atol=1e-5) or torch.allclose(
        quarter, torch.rot90(x, -1, (2, 3)), atol=1e-5
    )


def test_color_brightness_and_contrast_follow_the_formula():
    # one channel: saturation is a no-op, leaving x' = f * (x - mean) + mean + b with b in [-0.5, 0.5), f in [0.5, 1.5)
    x = _images(16, channels=1, size=8)
    out = DiffSiameseAugment("color")(x, seed=7)
    x_mean, out_mean = x.mean((1, 2, 3)), out.mean((1, 2, 3))
    b = out_mean - x_mean
    f = (out - out_mean.view(-1, 1, 1, 1)).flatten(1).norm(dim=1) / (x - x_mean.view(-1, 1, 1, 1)).flatten(1).norm(
        dim=1
    )
    expected = f.view(-1, 1, 1, 1) * (x - x_mean.view(-1, 1, 1, 1)) + (x_mean + b).view(-1, 1, 1, 1)
    assert torch.allclose(out, expected, atol=1e-5)
    assert (b >= -0.5).all() and (b < 0.5).all() and b.std() > 0.1
    assert (f >= 0.5 - 1e-5).all() and (f < 1.5 + 1e-5).all() and f.std() > 0.1
    no_shift = DiffSiameseAugment("color", brightness=0.0)(x, seed=7)
    assert torch.allclose(no_shift.mean((1, 2, 3)), x_mean, atol=1e-5)


def test_color_saturation_scales_the_deviation_from_the_channel_mean():
    x = _images(16, channels=3, size=8)
    out = DiffSiameseAugment("color", brightness=0.0)(x, seed=9)
    dev_in = x - x.mean(1, keepdim=True)
    dev_out = out - out.mean(1, keepdim=True)
    factor = (dev_out * dev_in).flatten(1).sum(1) / dev_in.pow(2).flatten(1).sum(1)  # saturation * contrast factor
    assert torch.allclose(dev_out, factor.view(-1, 1, 1, 1) * dev_in, atol=1e-5)
    assert (factor >= 0).all() and (factor < 2.0 * 1.5).all() and factor.std() > 0.1


def test_bad_strategy_and_groups():
    with pytest.raises(ValueError, match=r"unknown families \['blur'\].*'color', 'crop'"):
        DiffSiameseAugment("color_blur")
    with pytest.raises(ValueError, match="unknown families"):
        DiffSiameseAugment("")
    aug = DiffSiameseAugment()
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        aug(torch.zeros(2, 1, 4, 4), 0, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=">= 0"):
        aug(torch.zeros(2, 1, 4, 4), 0, torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="integer"):
        aug(torch.zeros(2, 1, 4, 4), 0, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        aug(torch.zeros(2, 4, 4), 0)
