import pytest
import torch

from monai_pld.networks import ConvNet, get_classifier


@pytest.mark.parametrize("channels,size,depth", [(3, 28, 3), (1, 28, 3), (3, 32, 3), (3, 64, 4), (1, 64, 3)])
def test_convnet_shapes(channels, size, depth):
    net = ConvNet(channels, 9, size, width=16, depth=depth)
    x = torch.rand(2, channels, size, size)
    assert net(x).shape == (2, 9)
    assert net.embed(x).shape == (2, net.num_features)


def test_reference_parameter_count():
    # 3-channel 32 px, 10 classes, width 128, depth 3, instance norm: 3,584 + 2 * 147,584 + 3 * 256 + 20,490
    net = ConvNet(3, 10, 32)
    assert sum(p.numel() for p in net.parameters()) == 3584 + 2 * 147584 + 3 * 256 + 20490 == 320010


def test_feature_sizes_follow_the_padding_rules():
    assert ConvNet(3, 9, 28).num_features == 128 * 3 * 3  # 28 -> 14 -> 7 -> 3 (the reference crashes here)
    assert ConvNet(1, 9, 28).num_features == 128 * 4 * 4  # padding 3 on the first layer: 32 -> 16 -> 8 -> 4


def test_registry_and_errors():
    assert isinstance(get_classifier("convnetbn", 3, 2, 32).features[1], torch.nn.BatchNorm2d)
    with pytest.raises(ValueError, match="unknown classifier"):
        get_classifier("resnet1000", 3, 2, 32)
    with pytest.raises(ValueError, match="norm"):
        ConvNet(3, 2, 32, norm="weird")
    with pytest.raises(ValueError, match="too small"):
        ConvNet(3, 2, 8, depth=5)
