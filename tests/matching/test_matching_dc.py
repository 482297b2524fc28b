"""DC (gradient matching with DSA): distances, the loss against a per-class formula, optimisation, outer/inner loops,
state round trip, batch norm, settings and errors."""

import json

import pytest
import torch
import torch.nn.functional as F

from monai_pld.matching import GradientMatcher, Matcher
from monai_pld.matching.gradient import REFERENCE_LOOPS, gradient_distance
from monai_pld.workflows import build_optimizer

SMALL = {"width": 16, "depth": 2}
DSA = "color_crop_cutout_flip_scale_rotate"


def _toy(n_per_class=6, classes=3, size=16, seed=0):
    """Images in [0, 1]: a distinct mean colour per class plus noise, grouped by class."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    colours = torch.rand(classes, 3, 1, 1, generator=gen)
    images = (colours[labels] + 0.15 * torch.randn(len(labels), 3, size, size, generator=gen)).clamp(0, 1)
    return images, labels


def _matcher(**kwargs):
    kwargs.setdefault("model_kwargs", SMALL)
    kwargs.setdefault("loops", "glad")
    return GradientMatcher(3, 3, 16, **kwargs)


def _per_class_formula(matcher, net, syn, syn_labels, real, real_labels):
    """The reference's loss without augmentation, with plain module autograd: sum over the classes in both sets and
    over the 2-D+ gradients of sum_rows (1 - cos), 1e-6 added to the norm product."""
    params = list(net.requires_grad_(True).parameters())
    total = torch.zeros(())
    for c in range(matcher.num_classes):
        r, s = real_labels == c, syn_labels == c
        if not r.any() or not s.any():
            continue
        g_real = torch.autograd.grad(F.cross_entropy(net(matcher.normalize(real[r])), real_labels[r]), params)
        g_syn = torch.autograd.grad(F.cross_entropy(net(matcher.normalize(syn[s])), syn_labels[s]), params)
        for a, b in zip(g_syn, g_real, strict=True):
            if a.ndim >= 2:
                a, b = a.flatten(1), b.flatten(1)
                total = total + (1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-6)).sum()
    return total


def test_distance_ours_by_hand():
    # rows orthogonal to their counterparts add 1 each; the 1-D gradient is ignored whatever it holds
    assert gradient_distance(
        [torch.eye(3), torch.ones(3)], [torch.roll(torch.eye(3), 1, 1), -torch.ones(3)]
    ).item() == (pytest.approx(3.0, abs=1e-5))
    # opposite rows add 2 each, a zero row adds 1 (the reference's 1e-6 keeps the cosine finite)
    assert gradient_distance([torch.eye(2)], [-torch.eye(2)]).item() == pytest.approx(4.0, abs=1e-5)
    assert gradient_distance([torch.tensor([[0.0, 0.0], [1.0, 2.0]])], [torch.ones(2, 2)]).item() == pytest.approx(
        1 + 1 - 3 / (2**0.5 * 5**0.5), abs=1e-5
    )
    # a conv gradient is one row per output channel: (2, 1, 2, 2) -> (2, 4); the second row is reversed
    conv = torch.arange(1.0, 9.0).view(2, 1, 2, 2)
    assert gradient_distance([conv], [conv * torch.tensor([1.0, -1.0]).view(2, 1, 1, 1)]).item() == pytest.approx(
        2.0, abs=1e-5
    )
    # a 3-D gradient is (C, rest) as well
    three = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    assert gradient_distance([three], [-three]).item() == pytest.approx(4.0, abs=1e-5)
    # identical gradients leave only what the 1e-6 adds: 1e-6 / (|row|^2 + 1e-6) per row
    g = [torch.full((4, 27), 0.01), torch.randn(4), torch.full((5, 8), 2.0)]
    expected = 4 * 1e-6 / (27e-4 + 1e-6) + 5 * 1e-6 / (32 + 1e-6)
    assert gradient_distance(g, g).item() == pytest.approx(expected, rel=1e-3)
    assert gradient_distance([torch.ones(4)], [torch.zeros(4)]).item() == 0.0  # nothing with two dimensions


def test_distance_mse_and_cos_by_hand():
    x, y = [torch.tensor([[3.0, 4.0]]), torch.tensor([1.0])], [torch.tensor([[0.0, 1.0]]), torch.tensor([0.0])]
    # flattened and concatenated, biases included: (3, 4, 1) against (0, 1, 0)
    assert gradient_distance(x, y, "mse").item() == pytest.approx(9 + 9 + 1)
    assert gradient_distance(x, y, "cos").item() == pytest.approx(1 - 4 / 26**0.5, abs=1e-5)
    with pytest.raises(ValueError, match="distance"):
        gradient_distance(x, y, "l1")
    with pytest.raises(ValueError, match="shape"):
        gradient_distance([torch.ones(2, 2)], [torch.ones(2, 3)])


def test_loss_equals_the_per_class_formula_and_ignores_missing_classes():
    real, real_labels = _toy()
    syn, syn_labels = _toy(n_per_class=2, seed=5)
    m = _matcher(dsa_strategy=None)
    assert isinstance(m, Matcher)
    expected = _per_class_formula(m, m.build_network(0), syn, syn_labels, real, real_labels)
    assert torch.allclose(m.loss(syn, syn_labels, real, real_labels, 1), expected, rtol=1e-4)
    keep = syn_labels != 2  # class 2 only in the real set: contributes nothing
    expected = _per_class_formula(m, m.build_network(0), syn[keep], syn_labels[keep], real, real_labels)
    assert torch.allclose(m.loss(syn[keep], syn_labels[keep], real, real_labels, 1), expected, rtol=1e-4)
    # no class in both sets: zero, and still back-propagates
    x = syn[syn_labels == 2].clone().requires_grad_(True)
    none = m.loss(x, syn_labels[syn_labels == 2], real[real_labels == 0], real_labels[real_labels == 0], 1)
    none.backward()
    assert none.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("dsa", [None, DSA])
def test_identical_sets_give_near_zero_loss(dsa):
    x, y = _toy()
    # the Siamese seed gives every class one transform in both sets, so identical sets have identical gradients
    for distance in ("mse", "cos"):
        assert abs(_matcher(dsa_strategy=dsa, distance=distance).loss(x, y, x.clone(), y, 1).item()) < 1e-5
    # 'ours' keeps the reference's 1e-6, which leaves sum_rows 1e-6 / (|row|^2 + 1e-6): small, not 0
    m = _matcher(dsa_strategy=dsa)
    same = m.loss(x, y, x.clone(), y, 1).item()
    assert 0 <= same < 0.01
    assert m.loss(_toy(seed=3)[0], y, x, y, 1).item() > 100 * same
    if dsa is None:
        assert same == pytest.approx(_per_class_formula(m, m.build_network(0), x, y, x, y).item(), rel=1e-3)


@pytest.mark.parametrize("loops", ["glad", (2, 1)])
def test_loss_decreases_and_gradients_reach_the_synthetic_images(loops):
    real, real_labels = _toy(n_per_class=12)
    syn = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    syn_labels = torch.arange(3).repeat_interleave(2)
    m = _matcher(dsa_strategy=None, loops=loops, seed=1)
    opt = torch.optim.Adam([syn], lr=0.05)
    losses = []
    for step in range(1, 31):
        loss = m.loss(syn.clamp(0, 1), syn_labels, real, real_labels, step)
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(syn.grad).all() and syn.grad.abs().sum() > 0
        # the network is the matcher's state, not something the outer optimiser learns
        assert all(p.grad is None and not p.requires_grad for p in m.parameters())
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-6:]) / 6 < 0.8 * sum(losses[:6]) / 6


def test_gradients_reach_the_synthetic_images_through_augmentation():
    real, real_labels = _toy()
    syn = _toy(n_per_class=2, seed=7)[0].requires_grad_(True)
    _matcher(dsa_strategy=DSA, seed=2).loss(syn, torch.arange(3).repeat_interleave(2), real, real_labels, 1).backward()
    assert torch.isfinite(syn.grad).all() and (syn.grad.flatten(1).abs().sum(1) > 0).all()


def test_outer_and_inner_loops():
    x, y = _toy()
    syn, syn_y = x[::3].clone(), y[::3]
    m = _matcher(loops=(2, 1), seed=4)
    m.loss(syn, syn_y, x, y, 1)
    first = {k: v.clone() for k, v in m.net.state_dict().items()}
    assert all(torch.equal(first[k], v) for k, v in m.build_network(0).state_dict().items())
    m.loss(syn, syn_y, x, y, 2)  # second outer step: the network is trained on the synthetic set first
    assert any(not torch.equal(first[k], v) for k, v in m.net.state_dict().items())
    m.loss(syn, syn_y, x, y, 3)  # a new cycle: the fresh network of cycle 1
    assert all(torch.equal(m.net.state_dict()[k], v) for k, v in m.build_network(1).state_dict().items())
    assert any(not torch.equal(first[k], m.net.state_dict()[k]) for k in first)
    # deterministic: two matchers with one seed agree step by step, another seed does not
    a, b, c = _matcher(loops=(2, 1), seed=4), _matcher(loops=(2, 1), seed=4), _matcher(loops=(2, 1), seed=5)
    rng = torch.get_rng_state()
    losses = [[n.loss(syn, syn_y, x, y, t).item() for t in range(1, 5)] for n in (a, b, c)]
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left alone
    assert losses[0] == losses[1] and losses[0] != losses[2]


@pytest.mark.parametrize("model", ["convnet", "convnetbn"])
def test_state_dict_round_trip_resumes_mid_cycle_exactly(model):
    x, y = _toy()
    syn, syn_y = x[::3].clone() * 0.9, y[::3]
    a = _matcher(model=model, loops=(3, 2), seed=2, dsa_strategy=DSA)
    for t in (1, 2):
        a.loss(syn, syn_y, x, y, t)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    rest = [a.loss(syn, syn_y, x, y, t).item() for t in (3, 4)]  # 3 continues cycle 0, 4 starts cycle 1
    b = _matcher(model=model, loops=(3, 2), seed=2, dsa_strategy=DSA)
    with pytest.raises(ValueError, match="state_dict"):  # without the state, step 3 cannot continue the cycle
        b.loss(syn, syn_y, x, y, 3)
    b.load_state_dict(state)
    assert [b.loss(syn, syn_y, x, y, t).item() for t in (3, 4)] == rest


def test_batchnorm_statistics_come_from_real_images_only():
    x, y = _toy()
    m = _matcher(model="convnetbn", dsa_strategy=DSA, bn_real_per_class=2)
    syn = x[::2].clone().requires_grad_(True)
    m.loss(syn, y[::2], x, y, 1).backward()
    assert torch.isfinite(syn.grad).all() and syn.grad.abs().sum() > 0
    # the fresh network after one train-mode pass over the first 2 real images of every class (not augmented):
    # the matching passes, synthetic or real, must not have moved the statistics
    reference = m.build_network(0)
    with torch.no_grad():
        reference(m.normalize(x[torch.cat([(y == c).nonzero().squeeze(1)[:2] for c in range(3)])]))
    expected = {k: v for k, v in reference.state_dict().items() if "running" in k or "num_batches" in k}
    got = {k: v for k, v in m.net.state_dict().items() if "running" in k or "num_batches" in k}
    assert expected and expected.keys() == got.keys()
    assert all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)
    assert m.net.training and all(module.training for module in m.net.modules())


def test_settings_are_recorded_and_the_optimiser_skips_the_network():
    m = GradientMatcher(3, 3, 16, ipc=10, model_kwargs=SMALL, distance="cos", dsa_strategy=None)
    assert (m.outer, m.inner) == REFERENCE_LOOPS[10] == (10, 50)
    settings = m.hyper_parameters()
    assert settings["loops"] == [10, 50] and settings["loops_rule"] == "reference" and settings["ipc"] == 10
    assert settings["distance"] == "cos" and settings["model"] == "convnet" and settings["model_kwargs"] == SMALL
    assert settings["lr_net"] == 0.01 and settings["batch_train"] == 256 and settings["dsa_strategy"] == ""
    json.dumps(settings)
    assert (_matcher(loops="glad").outer, _matcher(loops="glad").inner) == (1, 1)
    assert _matcher(loops=[3, 0]).hyper_parameters()["loops"] == [3, 0]
    codes = torch.nn.Module()
    codes.codes = torch.nn.Parameter(torch.zeros(3))
    assert [g["name"] for g in build_optimizer(codes, matcher=m).param_groups] == ["codes"]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"ipc": 7, "loops": "reference"}, "ipc"),
        ({"ipc": None, "loops": "reference"}, "ipc"),
        ({"ipc": 0, "loops": "glad"}, "ipc"),
        ({"distance": "l1"}, "distance"),
        ({"loops": (0, 1)}, "loops"),
        ({"loops": (1, -1)}, "loops"),
        ({"loops": (1, 2, 3)}, "loops"),
        ({"loops": (1.5, 2)}, "loops"),
        ({"loops": "fast"}, "loops"),
        ({"lr_net": 0.0}, "lr_net"),
        ({"batch_train": 0}, "batch_train"),
        ({"bn_real_per_class": 0}, "bn_real_per_class"),
        ({"model": "nope"}, "unknown classifier"),
        ({"dsa_strategy": "blur"}, "DSA strategy"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        GradientMatcher(3, 3, 16, **{"ipc": 1, "model_kwargs": SMALL, **kwargs})


def test_bad_calls():
    x, y = _toy(n_per_class=2)
    m = _matcher(loops=(2, 1))
    with pytest.raises(ValueError, match="step"):
        m.loss(x, y, x, y, 0)
    with pytest.raises(ValueError, match="synthetic"):
        m.loss(x[:, :1], y, x, y, 1)
    with pytest.raises(ValueError, match="real labels"):
        m.loss(x, y, x, y + 3, 1)
    m.loss(x, y, x, y, 1)
    with pytest.raises(ValueError, match="last step is 1"):  # step 4 would continue step 3's network
        m.loss(x, y, x, y, 4)
