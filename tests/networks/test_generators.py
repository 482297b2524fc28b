import pytest
import torch

from monai_pld.networks.generators import (
    AutoencoderKLGenerator,
    ExternalGenerator,
    FeatureLayerGenerator,
    GeneratorCheckpointError,
    PixelGenerator,
    at_layer,
    default_autoencoder_config,
    load_generator,
)


@pytest.mark.parametrize(
    "size,downsamplings,latent",
    [
        (28, None, (4, 14, 14)),
        (32, None, (4, 16, 16)),
        (64, None, (4, 16, 16)),
        (128, None, (4, 16, 16)),
        (28, 2, (4, 7, 7)),
    ],
)
def test_default_autoencoder_latent_shape(size, downsamplings, latent):
    gen = AutoencoderKLGenerator(**default_autoencoder_config(size, 3, downsamplings=downsamplings))
    assert gen.latent_shape == latent
    out = gen.decode(torch.zeros(2, *latent))
    assert out.shape == (2, 3, size, size)


def test_decode_range_and_gradient():
    torch.manual_seed(0)
    gen = AutoencoderKLGenerator(**default_autoencoder_config(28, 1)).freeze()
    f = (5 * torch.randn(3, *gen.latent_shape)).requires_grad_()
    images = gen.decode(f)
    assert images.min() >= 0 and images.max() <= 1
    images.mean().backward()
    assert f.grad is not None and f.grad.abs().sum() > 0
    assert all(p.grad is None for p in gen.parameters())  # frozen: gradients pass through, weights stay


def test_encode_decode_shapes():
    gen = AutoencoderKLGenerator(28, 3)
    z = gen.encode(torch.rand(2, 3, 28, 28))
    assert z.shape == (2, *gen.latent_shape)
    recon, mu, sigma = gen.reconstruct(torch.rand(2, 3, 28, 28))
    assert recon.shape == (2, 3, 28, 28) and mu.shape == sigma.shape == z.shape and (sigma > 0).all()


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    gen = AutoencoderKLGenerator(28, 3).freeze()
    path = gen.save(tmp_path / "g.pt", dataset="pathmnist", val_mae=0.1)
    payload = torch.load(path, weights_only=True)  # safe format: tensors and plain values only
    assert payload["kind"] == "autoencoderkl" and payload["metadata"]["dataset"] == "pathmnist"
    loaded = load_generator(path)
    f = torch.randn(2, *gen.latent_shape)
    assert torch.equal(gen.decode(f), loaded.decode(f))
    assert len(loaded.checkpoint_sha256) == 64 and not loaded.training


def test_corrupted_or_foreign_checkpoint_is_rejected(tmp_path):
    gen = AutoencoderKLGenerator(28, 3)
    path = gen.save(tmp_path / "g.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(GeneratorCheckpointError, match="corrupted"):
        load_generator(path)
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(GeneratorCheckpointError, match="not in monai_pld generator format"):
        load_generator(tmp_path / "other.pt")
    with pytest.raises(GeneratorCheckpointError, match="does not exist"):
        load_generator(tmp_path / "missing.pt")


def test_bad_architecture_values():
    with pytest.raises(ValueError, match="not divisible"):
        AutoencoderKLGenerator(30, 3, channels=(16, 32, 32))
    with pytest.raises(ValueError, match="norm_num_groups"):
        AutoencoderKLGenerator(28, 3, channels=(12, 32, 32), norm_num_groups=8)


def test_pixel_generator_is_identity():
    gen = PixelGenerator((3, 28, 28))
    x = torch.rand(2, 3, 28, 28)
    assert gen.latent_shape == (3, 28, 28) and torch.equal(gen.decode(x), x) and torch.equal(gen.encode(x), x)


def test_external_generator_module_and_torchscript(tmp_path):
    decoder = torch.nn.Sequential(torch.nn.Upsample(scale_factor=4), torch.nn.Conv2d(4, 3, 1), torch.nn.Tanh())
    gen = ExternalGenerator(decoder, latent_shape=(4, 7, 7), image_shape=(3, 28, 28), output_range=(-1, 1))
    f = torch.randn(2, 4, 7, 7)
    expected = (decoder(f) + 1) / 2
    assert torch.allclose(gen.decode(f), expected)
    assert not gen.has_encoder
    with pytest.raises(NotImplementedError, match="no encoder"):
        gen.encode(torch.rand(1, 3, 28, 28))
    path = tmp_path / "decoder.ts"
    torch.jit.save(torch.jit.trace(decoder, f), str(path))
    scripted = ExternalGenerator(str(path), latent_shape=(4, 7, 7), image_shape=(3, 28, 28), output_range=(-1, 1))
    assert torch.allclose(scripted.decode(f), expected, atol=1e-6)
    with pytest.raises(ValueError, match="output_range"):
        ExternalGenerator(decoder, (4, 7, 7), (3, 28, 28), output_range=(1, 1))


def test_feature_layer_split_reproduces_the_whole_decoder(tmp_path):
    torch.manual_seed(0)
    base = AutoencoderKLGenerator(**default_autoencoder_config(28, 3)).freeze()
    x = torch.rand(3, 3, 28, 28)
    whole = base.decode(base.encode(x))
    shapes = base.layer_shapes()
    for layer in range(1, base.num_layers - 1):
        split = at_layer(base, layer)
        assert isinstance(split, FeatureLayerGenerator) and split.latent_shape == shapes[layer - 1]
        h = split.encode(x)
        assert h.shape == (3, *shapes[layer - 1])
        torch.testing.assert_close(split.decode(h), whole)
    assert at_layer(base, 0) is base
    # a checkpoint loaded at a layer is the same split
    base.save(tmp_path / "g.pt")
    loaded = load_generator(tmp_path / "g.pt", latent_layer=2)
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), whole)
    assert loaded.layer == 2 and loaded.checkpoint_sha256 == load_generator(tmp_path / "g.pt").checkpoint_sha256


def test_feature_layer_gradient_reaches_the_feature_map_only():
    torch.manual_seed(0)
    split = at_layer(AutoencoderKLGenerator(**default_autoencoder_config(28, 1)).freeze(), 2)
    h = torch.randn(2, *split.latent_shape, requires_grad=True)
    split.decode(h).mean().backward()
    assert h.grad.abs().sum() > 0 and all(p.grad is None for p in split.parameters())


@pytest.mark.parametrize("layer", [-1, 6, 7, 1.5, True])
def test_feature_layer_out_of_range_names_the_valid_layers(layer):
    base = AutoencoderKLGenerator(**default_autoencoder_config(28, 3))
    with pytest.raises(ValueError, match=r"'latent_layer' must be 0 .* decoder block 1\.\.4 \(1: 32x14x14"):
        FeatureLayerGenerator(base, layer)


def test_only_the_autoencoder_can_be_split():
    with pytest.raises(ValueError, match="needs the autoencoder generator"):
        at_layer(PixelGenerator((3, 28, 28)), 2)
