import pytest
import torch

from monai_pld.networks import ConvNet, get_classifier


@pytest.mark.parametrize(
    "channels,size,depth,features",
    [
        (3, 28, 3, 16 * 3 * 3),  # 28 -> 14 -> 7 -> 3: the reference's bookkeeping says 4 x 4 here and crashes
        (1, 28, 3, 16 * 4 * 4),  # padding 3 on the first layer: 32 -> 16 -> 8 -> 4
        (3, 32, 3, 16 * 4 * 4),
        (3, 64, 4, 16 * 4 * 4),
    ],
)
def test_convnet_logits_and_features_for_any_size(channels, size, depth, features):
    net = ConvNet(channels, 9, size, width=16, depth=depth)
    x = torch.rand(2, channels, size, size)
    assert net.num_features == features
    assert net(x).shape == (2, 9)
    assert net.embed(x).shape == (2, features)


@pytest.mark.parametrize("norm", ["instancenorm", "batchnorm", "layernorm", "groupnorm", "none"])
@pytest.mark.parametrize("act,pool", [("relu", "avgpooling"), ("leakyrelu", "maxpooling"), ("swish", "none")])
def test_every_option_builds_and_runs(norm, act, pool):
    net = ConvNet(1, 4, 28, width=8, depth=2, norm=norm, act=act, pool=pool)
    out = net(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 4) and torch.isfinite(out).all()


def test_reference_parameter_count():
    # 3-channel 32 px, 10 classes, width 128, depth 3, instance norm, counted by hand in the reference notes
    net = ConvNet(3, 10, 32)
    assert sum(p.numel() for p in net.parameters()) == 320_010
    assert isinstance(net.features[1], torch.nn.GroupNorm) and net.features[1].num_groups == 128


def test_first_layer_padding_depends_on_channels():
    assert ConvNet(1, 2, 28, width=8).features[0].padding == (3, 3)
    assert ConvNet(3, 2, 28, width=8).features[0].padding == (1, 1)
    assert ConvNet(1, 2, 28, width=8).features[4].padding == (1, 1)


def test_feature_count_pass_leaves_batchnorm_statistics_and_train_mode():
    net = get_classifier("convnetbn", 3, 2, 16, width=8)
    bn = net.features[1]
    assert isinstance(bn, torch.nn.BatchNorm2d)
    assert int(bn.num_batches_tracked) == 0 and torch.equal(bn.running_mean, torch.zeros(8))
    assert net.training and bn.training


def test_registry_overrides_and_errors():
    net = get_classifier("ConvNet", 3, 5, 32, width=8, depth=2)
    assert isinstance(net, ConvNet) and net.num_features == 8 * 8 * 8
    with pytest.raises(ValueError, match=r"unknown classifier 'resnet1000'; known: \[.*'convnet', 'convnetbn'.*\]"):
        get_classifier("resnet1000", 3, 2, 32)
    with pytest.raises(ValueError, match="norm must be one of"):
        ConvNet(3, 2, 32, norm="weird")
    with pytest.raises(ValueError, match="act must be one of"):
        ConvNet(3, 2, 32, act="gelu")
    with pytest.raises(ValueError, match="too small"):
        ConvNet(3, 2, 8, depth=5)
    with pytest.raises(ValueError, match="multiple of 4"):
        ConvNet(3, 2, 8, width=6, norm="groupnorm")


def test_densenet_needs_64_px():
    with pytest.raises(ValueError, match="64 px"):
        get_classifier("densenet121", 3, 9, 28)
    assert get_classifier("densenet121", 1, 4, 64)(torch.rand(2, 1, 64, 64)).shape == (2, 4)


def test_vgg_and_alexnet_feature_sizes_follow_the_input():
    # 32 px: AlexNet's three pools give 4 x 4 x 192; VGG-11's five give 1 x 1 x 512
    assert get_classifier("alexnet", 3, 10, 32).num_features == 192 * 4 * 4
    assert get_classifier("vgg11", 3, 10, 32).num_features == 512
    # 28 px RGB: 28 -> 14 -> 7 -> 3 -> 1, the fifth pool is skipped
    assert get_classifier("vgg11", 3, 10, 28).num_features == 512
