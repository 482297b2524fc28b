"""DC (gradient matching with DSA): distance, zero loss on identical sets, optimisation, loops, state, batch norm."""

import pytest
import torch

from monai_pld.matching import GradientMatcher
from monai_pld.matching.gradient import REFERENCE_LOOPS, gradient_distance

SMALL = {"width": 16, "depth": 2}


def toy(n_per_class=6, classes=3, size=16, seed=0):
    """Classes with distinct mean colours."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    colours = torch.rand(classes, 3, 1, 1, generator=gen)
    images = (colours[labels] + 0.15 * torch.randn(len(labels), 3, size, size, generator=gen)).clamp(0, 1)
    return images, labels


def test_distance_ours_by_hand():
    g = [torch.randn(4, 3, 3, 3), torch.randn(4), torch.randn(5, 8)]
    assert gradient_distance(g, g).item() == pytest.approx(0.0, abs=1e-5)
    # rows orthogonal to their counterparts: each row adds 1; the 1-D bias is ignored whatever it holds
    a = [torch.eye(3), torch.ones(3)]
    b = [torch.roll(torch.eye(3), 1, dims=1), -torch.ones(3)]
    assert gradient_distance(a, b).item() == pytest.approx(3.0, abs=1e-5)
    # opposite rows add 2 each
    assert gradient_distance([torch.eye(2)], [-torch.eye(2)]).item() == pytest.approx(4.0, abs=1e-5)
    x, y = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 1.0]])
    assert gradient_distance([x], [y], "mse").item() == pytest.approx(9 + 9)
    assert gradient_distance([x], [y], "cos").item() == pytest.approx(1 - 4 / 5, abs=1e-5)


@pytest.mark.parametrize("dsa", [None, "color_crop_cutout_flip_scale_rotate"])
def test_identical_sets_give_near_zero_loss(dsa):
    x, y = toy()
    m = GradientMatcher(3, 3, 16, dsa_strategy=dsa, model_kwargs=SMALL, loops="glad")
    loss = m.loss(x, y, x, y, 1)
    # the reference's 1e-6 in the cosine denominators keeps it from being exactly 0
    assert 0 <= loss.item() < 0.05
    other = m.loss(toy(seed=3)[0], y, x, y, 1)
    assert other.item() > 20 * loss.item()


@pytest.mark.parametrize("loops", ["glad", (2, 1)])
def test_loss_decreases_under_optimisation(loops):
    real, real_labels = toy(n_per_class=12)
    syn = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    syn_labels = torch.arange(3).repeat_interleave(2)
    m = GradientMatcher(3, 3, 16, dsa_strategy=None, model_kwargs=SMALL, loops=loops, seed=1)
    opt = torch.optim.Adam([syn], lr=0.05)
    losses = []
    for step in range(1, 41):
        loss = m.loss(syn.clamp(0, 1), syn_labels, real, real_labels, step)
        opt.zero_grad()
        loss.backward()
        assert syn.grad is not None and torch.isfinite(syn.grad).all() and syn.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8


def test_outer_and_inner_loops():
    x, y = toy()
    m = GradientMatcher(3, 3, 16, model_kwargs=SMALL, loops=(2, 1), seed=4)
    m.loss(x, y, x, y, 1)
    first = {k: v.clone() for k, v in m.net.state_dict().items()}
    m.loss(x, y, x, y, 2)  # second outer step: trained on the synthetic set first
    assert any(not torch.equal(first[k], v) for k, v in m.net.state_dict().items())
    m.loss(x, y, x, y, 3)  # a new cycle: a fresh network, not the cycle-0 one
    third = m.net.state_dict()
    assert any(not torch.equal(first[k], third[k]) for k in first)
    again = GradientMatcher(3, 3, 16, model_kwargs=SMALL, loops=(2, 1), seed=4)
    again.loss(x, y, x, y, 1)
    assert all(torch.equal(first[k], v) for k, v in again.net.state_dict().items())


def test_state_dict_resumes_mid_cycle_exactly():
    x, y = toy()
    syn = x[::3].clone()
    syn_y = y[::3]
    a = GradientMatcher(3, 3, 16, model_kwargs=SMALL, loops=(3, 2), seed=2)
    losses = [a.loss(syn, syn_y, x, y, t).item() for t in (1, 2)]
    state = {k: v.clone() for k, v in a.state_dict().items()}
    rest = [a.loss(syn, syn_y, x, y, t).item() for t in (3, 4)]
    b = GradientMatcher(3, 3, 16, model_kwargs=SMALL, loops=(3, 2), seed=2)
    b.load_state_dict(state)
    assert [b.loss(syn, syn_y, x, y, t).item() for t in (3, 4)] == rest
    assert len(losses) == 2


def test_batchnorm_statistics_come_from_real_images_only():
    x, y = toy()
    m = GradientMatcher(3, 3, 16, model="convnetbn", model_kwargs=SMALL, loops="glad", dsa_strategy=None)
    syn = x[::2].clone().requires_grad_(True)
    m.loss(syn, y[::2], x, y, 1).backward()
    assert syn.grad.abs().sum() > 0
    # expected: the fresh network of cycle 0 after one train-mode pass over the real images (6 per class here, fewer
    # than bn_real_per_class); the matching passes must not have moved the statistics further
    reference = m._fresh_net(0)
    reference.train()
    with torch.no_grad():
        reference(m.normalize(x))
    expected = {k: v for k, v in reference.state_dict().items() if "running" in k}
    got = {k: v for k, v in m.net.state_dict().items() if "running" in k}
    assert expected and expected.keys() == got.keys()
    assert all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)


def test_settings_and_errors():
    m = GradientMatcher(3, 3, 16, ipc=10, model_kwargs=SMALL)
    assert (m.outer, m.inner) == REFERENCE_LOOPS[10] == (10, 50)
    assert m.hyper_parameters()["inner_loop"] == 50
    with pytest.raises(ValueError, match="ipc"):
        GradientMatcher(3, 3, 16, ipc=7)
    with pytest.raises(ValueError, match="distance"):
        GradientMatcher(3, 3, 16, ipc=1, distance="l1")
    with pytest.raises(ValueError, match="loops"):
        GradientMatcher(3, 3, 16, loops=(0, 1))
