"""Tests of the latent parameterisations: SLFD low-rank Gaussians and deterministic codes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from monai_pld.parameterizations import LatentCodes, LatentParameterization, SLFDistribution


@pytest.fixture(autouse=True)
def seeded():
    """The network's default initialisation draws from the global RNG: seed it so every test is deterministic."""
    torch.manual_seed(0)


def slots(num_classes: int = 2, ipc: int = 1, shape: tuple[int, int, int] = (2, 3, 3), dtype=torch.float32, seed=0):
    """Seeded initial codes and class-sorted labels."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randn(num_classes * ipc, *shape, generator=generator, dtype=dtype)
    return codes, torch.arange(num_classes).repeat_interleave(ipc)


@torch.no_grad()
def randomise_heads(model: SLFDistribution, seed: int = 1, std: float = 0.3, log_var_bias: float = -1.0) -> None:
    """Give every head non-trivial weights, so mu != u, d varies over elements and P is far from zero."""
    generator = torch.Generator().manual_seed(seed)
    for head in (model.head_mu, model.head_logd, model.head_P):
        if head is not None:
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator, dtype=head.weight.dtype) * std)
            head.bias.copy_(torch.randn(head.bias.shape, generator=generator, dtype=head.bias.dtype) * std)
    if model.head_logd is not None:
        model.head_logd.bias.add_(log_var_bias)


def dense_covariance(cov_factor: torch.Tensor, cov_diag: torch.Tensor) -> torch.Tensor:
    return cov_factor @ cov_factor.mT + torch.diag_embed(cov_diag)


class ToyGenerator:
    """Generator whose decode overshoots [0, 1] (so that render's clamp matters): 2 * sigmoid(conv1x1(f)) - 0.5."""

    def __init__(self, channels: int, size: int) -> None:
        self.latent_shape = (channels, size, size)
        self.conv = nn.Conv2d(channels, 1, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(1, channels, 1, 1, generator=torch.Generator().manual_seed(3)) * 10)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.sigmoid(self.conv(f)) - 0.5


def test_sample_moments_match_low_rank_covariance():
    codes, labels = slots(dtype=torch.float64)
    model = SLFDistribution(codes, labels, num_classes=2, rank=2, hidden_channels=8)
    randomise_heads(model, std=0.5)
    num_samples = 20000
    with torch.no_grad():
        mu, cov_factor, cov_diag = model.parameters_of_distribution()
        torch.manual_seed(0)
        latents, sample_labels = model.sample(num_samples)
    assert latents.shape == (num_samples * 2, 2, 3, 3)
    assert torch.equal(sample_labels, labels.repeat(num_samples))
    samples = latents.view(num_samples, 2, -1)
    sigma = dense_covariance(cov_factor, cov_diag)
    variances = sigma.diagonal(dim1=-2, dim2=-1)
    off_diagonal = sigma - torch.diag_embed(variances)
    assert off_diagonal.abs().max() > 0.2 * variances.max(), "the factor must contribute visibly to the covariance"
    # 5 Monte-Carlo standard errors per entry; for a Gaussian var(S_ij) = (S_ii S_jj + S_ij^2) / N
    mean_error = 5 * (variances / num_samples).sqrt()
    assert ((samples.mean(0) - mu).abs() <= mean_error).all()
    centred = samples - samples.mean(0)
    sample_cov = torch.einsum("nbi,nbj->bij", centred, centred) / (num_samples - 1)
    cov_error = 5 * ((variances[:, :, None] * variances[:, None, :] + sigma**2) / num_samples).sqrt()
    assert ((sample_cov - sigma).abs() <= cov_error).all()


def test_sample_equals_low_rank_normal_rsample_with_the_same_noise():
    codes, labels = slots(dtype=torch.float64)
    model = SLFDistribution(codes, labels, num_classes=2, rank=3, hidden_channels=8)
    randomise_heads(model)
    with torch.no_grad():
        torch.manual_seed(7)
        latents, _ = model.sample(4)
        torch.manual_seed(7)
        reference = model.distribution().rsample((4,))
    torch.testing.assert_close(latents, reference.reshape(latents.shape), rtol=0, atol=1e-12)


def test_factor_layout_is_rank_major_and_mean_matches_mu():
    codes, labels = slots(shape=(3, 2, 2))
    model = SLFDistribution(codes, labels, num_classes=2, rank=2, hidden_channels=4)
    randomise_heads(model)
    captured = {}
    model.head_P.register_forward_hook(lambda module, args, output: captured.update(maps=output))
    mu, cov_factor, _ = model.parameters_of_distribution()
    maps = captured["maps"]  # (slots, rank * C, h, w)
    for k in range(2):
        torch.testing.assert_close(cov_factor[:, :, k], maps[:, 3 * k : 3 * (k + 1)].flatten(1))
    torch.testing.assert_close(model.mean(), mu.view(2, 3, 2, 2))


def test_gradients_reach_codes_network_and_all_heads():
    codes, labels = slots(num_classes=3, ipc=2, shape=(4, 5, 5))
    model = SLFDistribution(codes, labels, num_classes=3, rank=4, hidden_channels=8)
    torch.manual_seed(0)
    latents, _ = model.sample(2)
    loss = (latents * torch.randn_like(latents)).sum() + latents.pow(2).sum()
    loss.backward()
    names = {name for name, _ in model.named_parameters()}
    expected = {"codes", "body_in.weight", "body_out.weight", "class_embedding.weight", "head_mu.weight"}
    expected |= {"head_mu.bias", "head_logd.weight", "head_logd.bias", "head_P.weight", "head_P.bias"}
    assert expected <= names
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_mean_equals_init_codes_at_init():
    codes, labels = slots(num_classes=3, ipc=2, shape=(4, 7, 7))
    model = SLFDistribution(codes, labels, num_classes=3)
    assert torch.equal(model.mean(), codes)
    mu, _, cov_diag = model.parameters_of_distribution()
    assert torch.equal(mu, codes.flatten(1))
    torch.testing.assert_close(cov_diag, torch.full_like(cov_diag, math.exp(-4.0)))
    codes.add_(1.0)
    assert not torch.equal(model.codes, codes), "the codes must be a copy of init_codes"


def test_deterministic_variant_samples_the_mean():
    codes, labels = slots(num_classes=2, ipc=2)
    prior = (codes[:2], codes[:2] ** 2 + 1)
    model = SLFDistribution(codes, labels, num_classes=2, rank=0, diagonal=False, class_prior=prior)
    assert model.head_P is None and model.head_logd is None
    latents, sample_labels = model.sample(3)
    assert torch.equal(latents, codes.repeat(3, 1, 1, 1))
    assert torch.equal(sample_labels, labels.repeat(3))
    randomise_heads(model)
    latents, _ = model.sample(2, antithetic=True)
    assert torch.equal(latents, model.mean().repeat(2, 1, 1, 1))
    _, cov_factor, cov_diag = model.parameters_of_distribution()
    assert cov_factor.shape == (4, 18, 0) and not cov_diag.any()
    assert model.kl_to_prior().item() == 0.0
    with pytest.raises(RuntimeError, match="deterministic"):
        model.distribution()


def test_latent_codes_sample_the_codes():
    codes, labels = slots(num_classes=3, ipc=2)
    model = LatentCodes(codes, labels, num_classes=3)
    assert isinstance(model, LatentParameterization)
    assert (model.num_classes, model.ipc, model.latent_shape, model.num_slots) == (3, 2, (2, 3, 3), 6)
    latents, sample_labels = model.sample(2)
    assert torch.equal(latents, torch.cat([codes, codes]))
    assert torch.equal(sample_labels, torch.cat([labels, labels]))
    latents.sum().backward()
    assert torch.equal(model.codes.grad, torch.full_like(codes, 2.0))
    assert model.kl_to_prior().item() == 0.0
    assert torch.equal(model.latents("sample", seed=3)[0], codes)
    mean, _ = model.latents("mean")
    assert not mean.requires_grad
    mean.add_(1.0)
    assert torch.equal(model.codes, codes), "latents() must hand out a copy, not the parameter"


def test_rank_zero_diagonal_is_an_independent_gaussian():
    codes, labels = slots()
    model = SLFDistribution(codes, labels, num_classes=2, rank=0, diagonal=True, hidden_channels=4)
    assert model.head_P is None
    _, cov_factor, _ = model.parameters_of_distribution()
    assert cov_factor.shape == (2, 18, 1) and not cov_factor.any()
    torch.manual_seed(0)
    latents, _ = model.sample(2)
    assert not torch.equal(latents[:2], latents[2:])
    assert not any(name.startswith("head_P") for name, _ in model.named_parameters())


def test_fixed_diagonal_floor_without_learned_variance():
    codes, labels = slots()
    model = SLFDistribution(codes, labels, num_classes=2, rank=2, diagonal=False, log_var_min=-7.0)
    assert model.head_logd is None
    _, _, cov_diag = model.parameters_of_distribution()
    torch.testing.assert_close(cov_diag, torch.full_like(cov_diag, math.exp(-7.0)))


@pytest.mark.parametrize("bias, bound", [(1e3, 1.0), (-1e3, -9.0)])
def test_variance_clamps_hold(bias, bound):
    codes, labels = slots()
    model = SLFDistribution(codes, labels, num_classes=2, rank=2)
    randomise_heads(model)
    with torch.no_grad():
        model.head_logd.bias.fill_(bias)
    _, _, cov_diag = model.parameters_of_distribution()
    torch.testing.assert_close(cov_diag, torch.full_like(cov_diag, math.exp(bound)))
    assert torch.isfinite(model.sample(2)[0]).all()


def test_antithetic_pairs_are_symmetric_around_the_mean():
    codes, labels = slots(num_classes=2, ipc=2)
    model = SLFDistribution(codes, labels, num_classes=2, rank=2, hidden_channels=8)
    randomise_heads(model)
    with torch.no_grad():
        torch.manual_seed(0)
        latents, sample_labels = model.sample(4, antithetic=True)
        mu = model.mean()
    latents = latents.view(4, 4, 2, 3, 3)
    torch.testing.assert_close(latents[0] + latents[2], 2 * mu)
    torch.testing.assert_close(latents[1] + latents[3], 2 * mu)
    assert (latents[0] - latents[1]).abs().max() > 1e-3, "the two pairs must use different noise"
    assert (latents[0] - mu).abs().max() > 1e-3
    assert torch.equal(sample_labels, labels.repeat(4))
    with pytest.raises(ValueError, match="even"):
        model.sample(3, antithetic=True)


def test_seeded_latents_are_reproducible_and_leave_the_global_rng_alone():
    codes, labels = slots(num_classes=2, ipc=2)
    model = SLFDistribution(codes, labels, num_classes=2, rank=2)
    randomise_heads(model)
    state = torch.get_rng_state()
    first, first_labels = model.latents("sample", seed=5)
    again, _ = model.latents("sample", seed=5)
    other, _ = model.latents("sample", seed=6)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert torch.equal(first_labels, labels) and not first.requires_grad
    mean, _ = model.latents("mean")
    assert torch.equal(mean, model.mean()) and not mean.requires_grad
    with pytest.raises(ValueError, match="mode"):
        model.latents("median")


def test_kl_is_zero_when_the_slots_equal_their_class_prior():
    num_classes, ipc, shape = 3, 2, (2, 3, 3)
    prior_mean = torch.randn(num_classes, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    log_var = torch.tensor([-1.5, 0.5], dtype=torch.float64)
    prior_var = log_var.exp()[None, :, None, None].expand(num_classes, *shape)
    labels = torch.arange(num_classes).repeat_interleave(ipc)
    model = SLFDistribution(
        prior_mean[labels], labels, num_classes, rank=0, diagonal=True, class_prior=(prior_mean, prior_var)
    )
    with torch.no_grad():
        model.head_logd.bias.copy_(log_var)
    assert abs(model.kl_to_prior().item()) < 1e-12
    with torch.no_grad():
        model.codes.add_(0.1)
    assert model.kl_to_prior().item() > 1e-4


def test_kl_matches_dense_closed_form():
    num_classes, ipc, shape = 2, 2, (2, 2, 2)
    codes, labels = slots(num_classes, ipc, shape, dtype=torch.float64)
    generator = torch.Generator().manual_seed(4)
    prior_mean = torch.randn(num_classes, *shape, generator=generator, dtype=torch.float64)
    prior_var = torch.rand(num_classes, *shape, generator=generator, dtype=torch.float64) * 1.5 + 0.5
    model = SLFDistribution(codes, labels, num_classes, rank=2, hidden_channels=6, class_prior=(prior_mean, prior_var))
    randomise_heads(model)
    kl = model.kl_to_prior()
    assert kl.requires_grad

    with torch.no_grad():
        mu, cov_factor, cov_diag = model.parameters_of_distribution()
    dim = mu.shape[1]
    expected = []
    for i in range(num_classes * ipc):
        sigma = cov_factor[i] @ cov_factor[i].T + torch.diag(cov_diag[i])
        prior_cov = torch.diag(prior_var[labels[i]].flatten())
        prior_inv = torch.linalg.inv(prior_cov)
        diff = prior_mean[labels[i]].flatten() - mu[i]
        value = 0.5 * (
            torch.trace(prior_inv @ sigma)
            + diff @ prior_inv @ diff
            - dim
            + torch.logdet(prior_cov)
            - torch.logdet(sigma)
        )
        expected.append(value / dim)
    torch.testing.assert_close(kl.detach(), torch.stack(expected).mean(), rtol=1e-9, atol=1e-12)
    kl.backward()
    assert model.codes.grad.abs().sum() > 0 and model.head_P.weight.grad.abs().sum() > 0


def test_kl_is_zero_without_a_prior():
    codes, labels = slots()
    model = SLFDistribution(codes, labels, num_classes=2, rank=2)
    kl = model.kl_to_prior()
    assert kl.shape == () and kl.item() == 0.0


def test_render_decodes_in_chunks_and_clamps():
    codes, labels = slots(num_classes=3, ipc=3, shape=(2, 4, 4))
    model = SLFDistribution(codes, labels, num_classes=3, rank=2)
    randomise_heads(model)
    generator = ToyGenerator(channels=2, size=4)
    images, image_labels = model.render(generator)
    assert images.shape == (9, 1, 4, 4) and torch.equal(image_labels, labels)
    assert images.min() == 0.0 and images.max() == 1.0, "the toy decoder overshoots, so both clamps must act"
    with torch.no_grad():
        torch.testing.assert_close(images, generator.decode(model.mean()).clamp(0, 1))
    # a conv may round differently for different batch sizes, so chunking is equal up to float32 rounding
    torch.testing.assert_close(model.render(generator, chunk_size=2)[0], images, rtol=0, atol=1e-6)
    sampled, _ = model.render(generator, mode="sample", seed=1, chunk_size=4)
    with torch.no_grad():
        reference = generator.decode(model.latents("sample", seed=1)[0]).clamp(0, 1)
    torch.testing.assert_close(sampled, reference)
    torch.testing.assert_close(
        model.render(generator, mode="sample", seed=1, chunk_size=1)[0], sampled, rtol=0, atol=1e-6
    )
    with pytest.raises(ValueError, match="chunk_size"):
        model.render(generator, chunk_size=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": -1}, "rank"),
        ({"labels": torch.tensor([1, 1, 0, 0])}, "sorted"),
        ({"labels": torch.tensor([0, 1, 0, 1])}, "sorted"),
        ({"labels": torch.tensor([0, 0, 0, 1])}, "same number of slots"),
        ({"labels": torch.tensor([0, 0, 2, 2])}, "lie in"),
        ({"labels": torch.tensor([0, 0, 1])}, "one label per slot"),
        ({"labels": torch.tensor([0.0, 0.0, 1.0, 1.0])}, "integer"),
        ({"init_codes": torch.zeros(4, 18)}, "init_codes"),
        ({"init_codes": torch.zeros(4, 2, 3, 3, dtype=torch.long)}, "init_codes"),
        ({"class_prior": (torch.zeros(2, 2, 3, 3), torch.ones(2, 2, 3))}, "class_prior"),
        ({"class_prior": (torch.zeros(3, 2, 3, 3), torch.ones(3, 2, 3, 3))}, "class_prior"),
        ({"class_prior": (torch.zeros(2, 2, 3, 3), torch.zeros(2, 2, 3, 3))}, "variances must be > 0"),
        ({"init_log_var": 2.0}, "init_log_var"),
        ({"log_var_min": 1.0, "log_var_max": 1.0}, "log_var_min"),
        ({"hidden_channels": 0}, "hidden_channels"),
    ],
)
def test_bad_inputs_are_rejected(kwargs, match):
    codes, labels = slots(num_classes=2, ipc=2)
    arguments = {"init_codes": codes, "labels": labels, "num_classes": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        SLFDistribution(**arguments)


def test_bad_sample_counts_are_rejected():
    codes, labels = slots()
    for model in (LatentCodes(codes, labels, 2), SLFDistribution(codes, labels, 2)):
        with pytest.raises(ValueError, match="n_per_slot"):
            model.sample(0)
        with pytest.raises(ValueError, match="even"):
            model.sample(1, antithetic=True)


def test_state_dict_round_trip(tmp_path):
    codes, labels = slots(num_classes=2, ipc=2)
    prior = (torch.zeros(2, 2, 3, 3), torch.ones(2, 2, 3, 3))
    model = SLFDistribution(codes, labels, num_classes=2, rank=3, hidden_channels=8, class_prior=prior)
    randomise_heads(model)
    path = tmp_path / "distribution.pt"
    torch.save(model.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert not any(key.startswith("prior") for key in state), "the class prior summarises real data: never shared"

    restored = SLFDistribution(torch.zeros_like(codes), labels, num_classes=2, rank=3, hidden_channels=8)
    restored.load_state_dict(state)
    assert torch.equal(restored.mean(), model.mean())
    assert torch.equal(restored.latents("sample", seed=2)[0], model.latents("sample", seed=2)[0])
    torch.manual_seed(9)
    expected, _ = model.sample(2)
    torch.manual_seed(9)
    assert torch.equal(restored.sample(2)[0], expected)

    codes_model = LatentCodes(codes, labels, 2)
    torch.save(codes_model.state_dict(), path)
    restored_codes = LatentCodes(torch.zeros_like(codes), labels, 2)
    restored_codes.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(restored_codes.mean(), codes)


def test_builder_seeds_the_network_whatever_the_global_rng_holds():
    from monai_pld.data import ImageSet
    from monai_pld.networks.generators import PixelGenerator
    from monai_pld.workflows import build_parameterization

    gen = torch.Generator().manual_seed(0)
    data = ImageSet(
        torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=gen), torch.arange(12) % 3, list("abc")
    )
    built = []
    for global_seed, seed in ((1, 0), (2, 0), (1, 5)):
        torch.manual_seed(global_seed)
        param = build_parameterization("slfd", PixelGenerator((3, 8, 8)), data, ipc=2, seed=seed)
        built.append({k: v for k, v in param.state_dict().items() if k not in ("codes", "labels")})  # the network
    assert all(torch.equal(built[0][k], built[1][k]) for k in built[0])  # another global state, the same network
    assert not all(torch.equal(built[0][k], built[2][k]) for k in built[0])  # another seed, another network


@pytest.mark.parametrize(
    "kwargs,antithetic",
    [
        ({"rank": 3}, False),  # low rank + learned diagonal, rsample's draw
        ({"rank": 3}, True),  # antithetic pairs
        ({"rank": 0, "diagonal": True}, False),  # diagonal only: rsample still draws a (zero) factor's noise
        ({"rank": 2, "diagonal": False}, False),  # low rank + the fixed floor
        ({"rank": 0, "diagonal": False}, False),  # deterministic: the means
    ],
)
def test_a_subset_of_slots_draws_its_part_of_the_whole_draw(kwargs, antithetic):
    """What a rank samples for its slots under torchrun is its rows of what one process samples for all of them."""
    codes, labels = slots(num_classes=3, ipc=3, dtype=torch.float64)
    model = SLFDistribution(codes, labels, num_classes=3, hidden_channels=8, **kwargs)
    randomise_heads(model)
    own = torch.tensor([1, 4, 7])
    torch.manual_seed(5)
    whole, whole_labels = model.sample(4, antithetic=antithetic)
    torch.manual_seed(5)
    part, part_labels = model.sample(4, antithetic=antithetic, slots=own)
    rows = (torch.arange(4)[:, None] * 9 + own).flatten()  # sample-major: sample k of slot s is row k * 9 + s
    torch.testing.assert_close(part, whole[rows], rtol=0, atol=1e-12)
    assert torch.equal(part_labels, whole_labels[rows])
    torch.testing.assert_close(model.mean(own), model.mean()[own], rtol=0, atol=1e-12)
    codes_only = LatentCodes(codes, labels, num_classes=3)
    assert torch.equal(
        codes_only.sample(2, slots=own)[0], codes_only.sample(2)[0][(torch.arange(2)[:, None] * 9 + own).flatten()]
    )


@pytest.mark.parametrize("antithetic", [False, True])
@pytest.mark.parametrize("own", [None, torch.tensor([1, 4, 7])])
def test_with_mean_puts_the_means_before_the_same_samples(antithetic, own):
    """The means and the samples share one pass of the network; the values are those of mean() and sample()."""
    codes, labels = slots(num_classes=3, ipc=3, dtype=torch.float64)
    model = SLFDistribution(codes, labels, num_classes=3, rank=3, hidden_channels=8)
    randomise_heads(model)
    n = 9 if own is None else len(own)
    torch.manual_seed(5)
    both, both_labels = model.sample(2, antithetic=antithetic, slots=own, with_mean=True)
    torch.manual_seed(5)
    samples, sample_labels = model.sample(2, antithetic=antithetic, slots=own)
    assert both.shape == (3 * n, *codes.shape[1:])
    torch.testing.assert_close(both[:n], model.mean(own), rtol=0, atol=1e-12)
    torch.testing.assert_close(both[n:], samples, rtol=0, atol=1e-12)
    mean_labels = labels if own is None else labels[own]
    assert torch.equal(both_labels, torch.cat([mean_labels, sample_labels]))
    # deterministic codes: the codes, once more
    codes_only = LatentCodes(codes, labels, num_classes=3)
    latents, _ = codes_only.sample(1, slots=own, with_mean=True)
    assert torch.equal(latents, codes_only.mean(own).repeat(2, 1, 1, 1))
