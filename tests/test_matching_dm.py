import pytest
import torch

from monai_pld.matching import DistributionMatcher


def _toy(n_per_class=6, classes=3, size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    images = torch.rand(len(labels), 3, size, size, generator=gen) * 0.3 + labels.view(-1, 1, 1, 1) * 0.3
    return images, labels


def test_zero_for_identical_sets():
    real, labels = _toy()
    for strategy in (None, "color_crop_cutout_flip_scale_rotate"):
        m = DistributionMatcher(3, 3, 16, seed=1, dsa_strategy=strategy, embedder_kwargs={"width": 16})
        assert m.loss(real.clone(), labels, real, labels, step=4).item() < 1e-8


def test_zero_for_equal_class_means_under_siamese_augmentation():
    real, labels = _toy(n_per_class=1)
    m = DistributionMatcher(3, 3, 16, embedder_kwargs={"width": 16})
    many = real.repeat_interleave(5, 0)  # every class 5 copies of its one image: same per-class mean
    assert m.loss(real, labels, many, labels.repeat_interleave(5), step=2).item() < 1e-6


def test_positive_for_different_sets_and_missing_classes_ignored():
    real, labels = _toy()
    syn, _ = _toy(seed=9)
    m = DistributionMatcher(3, 3, 16, dsa_strategy=None, embedder_kwargs={"width": 16})
    assert m.loss(syn, labels, real, labels, 0).item() > 0
    keep = labels != 2
    full = m.loss(syn[keep], labels[keep], real, labels, 0)
    partial = m.loss(syn[keep], labels[keep], real[keep], labels[keep], 0)
    assert torch.allclose(full, partial)  # class 2 has no synthetic image, so its real images do not count


def test_embedder_depends_on_step_only_and_global_rng_untouched():
    m = DistributionMatcher(3, 3, 16)
    state = torch.get_rng_state()
    a, b, c = m.embedder(3, torch.device("cpu")), m.embedder(3, torch.device("cpu")), m.embedder(4, torch.device("cpu"))
    assert torch.equal(state, torch.get_rng_state())
    wa, wb, wc = (next(n.parameters()) for n in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert not any(p.requires_grad for p in a.parameters())


def test_loss_decreases_when_optimising_pixels():
    real, labels = _toy(n_per_class=20)
    syn = torch.rand(6, 3, 16, 16).requires_grad_()
    syn_labels = torch.arange(3).repeat_interleave(2)
    m = DistributionMatcher(3, 3, 16, embedder_kwargs={"width": 32})
    opt = torch.optim.SGD([syn], lr=1.0, momentum=0.5)
    losses = []
    for step in range(40):
        loss = m.loss(syn, syn_labels, real, labels, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.75 * sum(losses[:5])


def test_bad_inputs():
    m = DistributionMatcher(3, 3, 16)
    real, labels = _toy()
    with pytest.raises(ValueError, match=r"synthetic images must have shape \(N, 3, 16, 16\)"):
        m.loss(real[:, :1], labels, real, labels, 0)
    with pytest.raises(ValueError, match=r"real labels must lie in \[0, 3\)"):
        m.loss(real, labels, real, labels + 1, 0)
    with pytest.raises(ValueError, match="mean/std need 3 values"):
        DistributionMatcher(3, 3, 16, mean=[0.5])
