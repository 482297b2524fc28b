import pytest
import torch

from monai_pld.matching import DistributionMatcher, Matcher

CPU = torch.device("cpu")


def _toy(n_per_class=6, classes=3, size=16, seed=0):
    """Images in [0, 1] whose brightness encodes the class, grouped by class."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    images = torch.rand(len(labels), 3, size, size, generator=gen) * 0.3 + labels.view(-1, 1, 1, 1) * 0.3
    return images, labels


def _matcher(**kwargs):
    kwargs.setdefault("embedder_kwargs", {"width": 16})
    return DistributionMatcher(3, 3, 16, **kwargs)


def test_zero_for_identical_sets_without_augmentation():
    real, labels = _toy()
    m = _matcher(seed=1, dsa_strategy=None)
    assert m.loss(real.clone(), labels, real, labels, step=4).item() < 1e-10


def test_near_zero_for_equal_class_content_under_siamese_augmentation():
    one, labels = _toy(n_per_class=1)
    order = torch.tensor([2, 0, 1])
    many = one.repeat_interleave(7, 0)  # every class 7 copies of its one image: same content, other counts
    m = _matcher(seed=3)
    for step in range(4):
        loss = m.loss(one[order], labels[order], many, labels.repeat_interleave(7), step=step)
        assert loss.item() < 1e-6


def test_positive_for_different_sets():
    real, labels = _toy()
    syn, _ = _toy(seed=9)
    for strategy in (None, "color_crop_cutout_flip_scale_rotate"):
        assert _matcher(dsa_strategy=strategy).loss(syn, labels, real, labels, 0).item() > 1e-4


def test_loss_equals_the_per_class_formula():
    real, labels = _toy()
    syn, _ = _toy(seed=9)
    m = _matcher(dsa_strategy=None)
    net = m.build_embedder(5, CPU)
    fr, fs = net.embed(m.normalize(real)), net.embed(m.normalize(syn))
    expected = sum((fr[labels == c].mean(0) - fs[labels == c].mean(0)).pow(2).sum() for c in range(3))
    assert torch.allclose(m.loss(syn, labels, real, labels, 5), expected, rtol=1e-4)


def test_classes_missing_from_either_set_are_ignored():
    real, labels = _toy()
    syn, _ = _toy(seed=9)
    m = _matcher()
    keep = labels != 2
    without_syn_2 = m.loss(syn[keep], labels[keep], real, labels, 0)
    both_without_2 = m.loss(syn[keep], labels[keep], real[keep], labels[keep], 0)
    without_real_2 = m.loss(syn, labels, real[keep], labels[keep], 0)
    assert without_syn_2.item() > 0
    assert torch.allclose(without_syn_2, both_without_2) and torch.allclose(without_real_2, both_without_2)


def test_gradient_reaches_synthetic_images_only():
    real, labels = _toy()
    syn = _toy(seed=9)[0].requires_grad_()
    loss = _matcher().loss(syn, labels, real, labels, 0)
    loss.backward()
    assert torch.isfinite(syn.grad).all() and syn.grad.abs().sum() > 0
    assert not real.requires_grad


def test_embedder_is_a_function_of_seed_and_step_and_global_rng_untouched():
    m, other_seed = _matcher(), _matcher(seed=1)
    state = torch.get_rng_state()
    a, b, c, d = (
        m.build_embedder(3, CPU),
        m.build_embedder(3, CPU),
        m.build_embedder(4, CPU),
        other_seed.build_embedder(3, CPU),
    )
    real, labels = _toy()
    m.loss(real, labels, real, labels, 3)
    assert torch.equal(state, torch.get_rng_state())
    wa, wb, wc, wd = (next(n.parameters()) for n in (a, b, c, d))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc) and not torch.equal(wa, wd)
    assert not any(p.requires_grad for p in a.parameters()) and a.training


def test_same_step_same_loss_different_step_different_loss():
    real, labels = _toy()
    syn, _ = _toy(seed=9)
    m = _matcher()
    first, again, other = (m.loss(syn, labels, real, labels, s) for s in (7, 7, 8))
    assert torch.equal(first, again) and not torch.allclose(first, other)


def test_loss_decreases_when_optimising_pixels():
    real, labels = _toy(n_per_class=12)
    syn = (0.05 * torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))).requires_grad_()
    syn_labels = torch.arange(3).repeat_interleave(2)
    m = _matcher()

    def held_out_loss():
        # averaged over embedders and augmentations never used for training, to see past their randomness
        with torch.no_grad():
            return sum(m.loss(syn, syn_labels, real, labels, 1000 + s).item() for s in range(8)) / 8

    before = held_out_loss()
    opt = torch.optim.Adam([syn], lr=0.05)
    for step in range(30):
        loss = m.loss(syn, syn_labels, real, labels, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert held_out_loss() < 0.6 * before


def test_bad_inputs():
    m = _matcher()
    real, labels = _toy()
    with pytest.raises(ValueError, match=r"synthetic images must have shape \(N, 3, 16, 16\)"):
        m.loss(real[:, :1], labels, real, labels, 0)
    with pytest.raises(ValueError, match=r"real images must have shape \(N, 3, 16, 16\), got \(18, 16, 16\)"):
        m.loss(real, labels, real[:, 0], labels, 0)
    with pytest.raises(ValueError, match=r"real labels must lie in \[0, 3\)"):
        m.loss(real, labels, real, labels + 1, 0)
    with pytest.raises(ValueError, match=r"synthetic labels must have shape \(18,\)"):
        m.loss(real, labels[:-1], real, labels, 0)
    with pytest.raises(ValueError, match="synthetic labels must be an integer tensor"):
        m.loss(real, labels.float(), real, labels, 0)
    with pytest.raises(ValueError, match="mean/std need 3 values"):
        DistributionMatcher(3, 3, 16, mean=[0.5])
    with pytest.raises(ValueError, match="unknown classifier"):
        DistributionMatcher(3, 3, 16, embedder="nope")
    with pytest.raises(ValueError, match="unknown families"):
        DistributionMatcher(3, 3, 16, dsa_strategy="color_blur")
    with pytest.raises(TypeError):
        Matcher(3, 3, 16)  # abstract


def test_normalize_uses_per_channel_statistics():
    m = DistributionMatcher(3, 3, 16, mean=[0.1, 0.2, 0.3], std=[0.5, 0.25, 1.0], embedder_kwargs={"width": 16})
    out = m.normalize(torch.full((1, 3, 2, 2), 0.6))
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([1.0, 1.6, 0.3]))
    assert m.mean.shape == (1, 3, 1, 1) and "mean" not in m.state_dict()


def test_unbiased_estimator_is_the_pooled_loss_minus_the_spread_of_the_halves():
    # with halves a, b of equal size, |r - (a+b)/2|^2 - <r - a, r - b> = |a - b|^2 / 4 per class
    real, labels = _toy()
    syn_a, _ = _toy(seed=9)
    syn_b, _ = _toy(seed=10)
    syn, syn_labels = torch.cat([syn_a, syn_b]), labels.repeat(2)
    groups = torch.arange(2).repeat_interleave(len(labels))
    pooled = _matcher(dsa_strategy=None).loss(syn, syn_labels, real, labels, 2)
    m = _matcher(dsa_strategy=None, estimator="unbiased")
    unbiased = m.loss(syn, syn_labels, real, labels, 2, syn_groups=groups)
    net = m.build_embedder(2, CPU)
    fa, fb = net.embed(m.normalize(syn_a)), net.embed(m.normalize(syn_b))
    spread = sum((fa[labels == c].mean(0) - fb[labels == c].mean(0)).pow(2).sum() for c in range(3)) / 4
    assert spread.item() > 1e-4
    torch.testing.assert_close(pooled - unbiased, spread, rtol=1e-3, atol=1e-6)
    # without groups (a deterministic set) it is the pooled loss
    assert torch.equal(m.loss(syn, syn_labels, real, labels, 2), pooled)


def test_unbiased_estimator_counts_shared_images_in_both_halves():
    real, labels = _toy()
    means, _ = _toy(seed=9)
    m = _matcher(dsa_strategy=None, estimator="unbiased")
    # the means in both halves and no samples: both halves are the means, so the loss is the pooled one
    shared = torch.full((len(means),), 2)
    pooled = _matcher(dsa_strategy=None).loss(means, labels, real, labels, 1)
    torch.testing.assert_close(m.loss(means, labels, real, labels, 1, syn_groups=shared), pooled)
    # identical halves around the means: no spread, so again the pooled loss of the images
    syn = torch.cat([means, means, means])
    groups = torch.cat([shared, torch.zeros_like(shared), torch.ones_like(shared)])
    torch.testing.assert_close(m.loss(syn, labels.repeat(3), real, labels, 1, syn_groups=groups), pooled)


def test_unbiased_estimator_bad_values():
    real, labels = _toy()
    with pytest.raises(ValueError, match="estimator must be one of"):
        _matcher(estimator="median")
    m = _matcher(estimator="unbiased")
    with pytest.raises(ValueError, match="syn_groups must hold one value in"):
        m.loss(real, labels, real, labels, 0, syn_groups=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="syn_groups must hold one value in"):
        m.loss(real, labels, real, labels, 0, syn_groups=torch.full((len(labels),), 3))


def test_std_term_equals_the_per_class_formula_and_adds_to_the_means():
    real, labels = _toy()
    syn, _ = _toy(seed=9)
    syn = syn * 0.5 + 0.2  # a different spread from the real images'
    m = _matcher(dsa_strategy=None, std_weight=0.5)
    net = m.build_embedder(5, CPU)
    fr, fs = net.embed(m.normalize(real)), net.embed(m.normalize(syn))
    means = sum((fr[labels == c].mean(0) - fs[labels == c].mean(0)).pow(2).sum() for c in range(3))
    stds = sum((fr[labels == c].std(0) - fs[labels == c].std(0)).pow(2).sum() for c in range(3))
    assert stds.item() > 1e-3
    torch.testing.assert_close(m.loss(syn, labels, real, labels, 5), means + 0.5 * stds, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(_matcher(dsa_strategy=None).loss(syn, labels, real, labels, 5), means, rtol=1e-4, atol=0)
    assert m.hyper_parameters()["std_weight"] == 0.5


def test_std_term_pulls_the_spread_of_a_set_toward_the_real_one():
    # each class's mean real image jittered by a learnable scale of fixed noise: the spread term alone (the loss with
    # it minus the loss without) pushes a small scale up and a large one down
    real, labels = _toy(n_per_class=8)
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(1))
    centre = torch.stack([real[labels == c].mean(0) for c in range(3)])[labels]
    with_term, without = _matcher(dsa_strategy=None, std_weight=1), _matcher(dsa_strategy=None)
    for start, sign in ((0.01, -1), (3.0, 1)):
        scale = torch.tensor(start, requires_grad=True)
        syn = centre + scale * noise
        (with_term.loss(syn, labels, real, labels, 3) - without.loss(syn, labels, real, labels, 3)).backward()
        assert scale.grad.item() * sign > 1e-3


def test_std_term_ignores_classes_with_one_synthetic_image_and_checks_its_weight():
    real, labels = _toy()
    one = torch.stack([real[labels == c][0] for c in range(3)])
    plain = _matcher(dsa_strategy=None).loss(one, torch.arange(3), real, labels, 2)
    torch.testing.assert_close(
        _matcher(dsa_strategy=None, std_weight=1).loss(one, torch.arange(3), real, labels, 2), plain
    )
    for bad in (-1, float("nan"), "1", True):
        with pytest.raises(ValueError, match="std_weight must be a number >= 0"):
            _matcher(std_weight=bad)
    with pytest.raises(ValueError, match="std_weight needs the pooled estimator"):
        _matcher(std_weight=1, estimator="unbiased")


def _mmd_by_pairs(fr, lr, fs, ls, classes):
    """The multi-bandwidth Gaussian MMD^2 summed over classes, pair by pair."""
    real_d = [(fr[i] - fr[j]).pow(2).sum() for i in range(len(fr)) for j in range(i + 1, len(fr))]
    m = torch.stack(real_d).median()

    def k(u, v):
        return sum(torch.exp(-(u - v).pow(2).sum() / (b * m)) for b in (0.25, 1.0, 4.0))

    total = 0.0
    for c in range(classes):
        r, s = fr[lr == c], fs[ls == c]
        rr = sum(k(a, b) for a in r for b in r) / len(r) ** 2
        rs = sum(k(a, b) for a in r for b in s) / (len(r) * len(s))
        ss = sum(k(a, b) for a in s for b in s) / len(s) ** 2
        total = total + rr - 2 * rs + ss
    return total


def test_gaussian_kernel_is_the_per_class_mmd_and_zero_for_the_real_set():
    real, labels = _toy(n_per_class=4)
    syn, syn_labels = _toy(n_per_class=2, seed=9)
    m = _matcher(dsa_strategy=None, kernel="gaussian")
    net = m.build_embedder(5, CPU)
    with torch.no_grad():
        fr, fs = net.embed(m.normalize(real)), net.embed(m.normalize(syn))
        expected = _mmd_by_pairs(fr, labels, fs, syn_labels, 3)
        assert expected.item() > 1e-3
        torch.testing.assert_close(m.loss(syn, syn_labels, real, labels, 5), expected, rtol=1e-4, atol=1e-6)
        # the real set itself (in another order) has no discrepancy, whatever its spread
        order = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))
        assert m.loss(real[order], labels[order], real, labels, 5).abs().item() < 1e-5
    assert m.hyper_parameters()["kernel"] == "gaussian" and m.class_split is None
    assert _matcher().class_split == "samples"


def test_gaussian_kernel_rewards_a_set_that_spreads_like_the_real_one():
    # the linear (mean) loss cannot tell a class's spread images from copies of their mean; the kernel loss can,
    # and its gradient pushes a collapsed set's spread up
    real, labels = _toy(n_per_class=8)
    noise = real - torch.stack([real[labels == c].mean(0) for c in range(3)])[labels]
    centre = real - noise
    gaussian = _matcher(dsa_strategy=None, kernel="gaussian")
    scale = torch.tensor(0.05, requires_grad=True)
    loss = gaussian.loss(centre + scale * noise, labels, real, labels, 3)
    loss.backward()
    assert scale.grad.item() < 0  # more spread, less loss
    with torch.no_grad():
        assert gaussian.loss(real, labels, real, labels, 3).item() < loss.item()


def test_gaussian_kernel_bad_values():
    with pytest.raises(ValueError, match="DM kernel must be one of"):
        _matcher(kernel="rbf")
    for bad in ({"estimator": "unbiased"}, {"std_weight": 1}):
        with pytest.raises(ValueError, match="compares whole distributions"):
            _matcher(kernel="gaussian", **bad)
    real, labels = _toy()
    with pytest.raises(ValueError, match="without across_ranks"):
        _matcher(kernel="gaussian").loss(real, labels, real, labels, 0, across_ranks=True)
