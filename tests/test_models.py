"""Tests of models/: exact parameter counts, output shapes on every data-set shape, the registry."""

import pytest
import torch
from torch import nn

from hessianflow.training.models import (
    ARCHS,
    C1,
    C2,
    ResNet,
    canonical_arch,
    count_parameters,
    get_model,
    resnet_num_blocks,
)

# (in_channels, input_size, num_classes) of each data set the scripts support.
SHAPES = {
    "cifar10": (3, 32, 10),
    "cifar100": (3, 32, 100),
    "svhn": (3, 32, 10),
    "mnist": (1, 28, 10),
}


def conv_params(cin, cout, k, bias=True):
    return cin * cout * k * k + (cout if bias else 0)


def linear_params(fin, fout):
    return fin * fout + fout


BN = 2  # weight and bias per channel (running statistics are buffers, not parameters)


def expected_resnet_params(depth, num_classes=10, in_channels=3):
    """He et al. (2016) CIFAR ResNet, basic blocks, option-B projections, written out stage by stage."""
    n = (depth - 2) // 6
    total = conv_params(in_channels, 16, 3, bias=False) + BN * 16
    cin = 16
    for width in (16, 32, 64):
        for i in range(n):
            first_in = cin if i == 0 else width
            total += conv_params(first_in, width, 3, bias=False) + BN * width
            total += conv_params(width, width, 3, bias=False) + BN * width
            if first_in != width:  # projection shortcut: 1x1 convolution + batch norm
                total += conv_params(first_in, width, 1, bias=False) + BN * width
        cin = width
    return total + linear_params(64, num_classes)


def expected_c1_params(num_classes, in_channels, size):
    s = size
    for _ in range(2):  # maxpool(3, stride 2, padding 1) rounds up
        s = (s + 1) // 2
    return (
        conv_params(in_channels, 64, 5) + BN * 64 + conv_params(64, 64, 5) + BN * 64
        + linear_params(64 * s * s, 384) + linear_params(384, 192) + linear_params(192, num_classes)
    )  # fmt: skip


def expected_c2_params(num_classes, in_channels, size):
    s = ((size - 4) // 2 - 4) // 2
    convs = sum(conv_params(a, b, 3) + BN * b for a, b in ((in_channels, 64), (64, 64), (64, 128), (128, 128)))
    return convs + linear_params(128 * s * s, 256) + linear_params(256, 256) + linear_params(256, num_classes)


def test_cifar10_parameter_counts_are_exact():
    assert count_parameters(get_model("c1")) == 1_756_682
    assert count_parameters(get_model("c2")) == 1_148_746
    assert count_parameters(get_model("ResNet", depth=20)) == 272_474
    # and the formulas used below agree with these published-by-HessianFlow/He et al. numbers
    assert expected_c1_params(10, 3, 32) == 1_756_682
    assert expected_c2_params(10, 3, 32) == 1_148_746
    assert expected_resnet_params(20) == 272_474


@pytest.mark.parametrize("depth", [8, 20, 32, 44, 56, 110])
def test_resnet_depths_use_basic_blocks(depth):
    model = get_model("resnet", depth=depth)
    assert count_parameters(model) == expected_resnet_params(depth)
    n = (depth - 2) // 6
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3)] == [n, n, n]
    # 6n + 2 weighted layers: 6n 3x3 convolutions in the blocks, the stem convolution and the FC layer
    convs3 = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs3) + len(linears) == depth
    # exactly two projection shortcuts (entering stages 2 and 3)
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules()) == 2


@pytest.mark.parametrize("dataset", sorted(SHAPES))
@pytest.mark.parametrize("arch", ARCHS)
def test_every_model_on_every_dataset_shape(arch, dataset):
    cin, size, k = SHAPES[dataset]
    torch.manual_seed(0)
    model = get_model(arch, depth=20, num_classes=k, in_channels=cin, input_size=size)
    x = torch.randn(3, cin, size, size)
    out = model(x)
    assert out.shape == (3, k)
    assert torch.isfinite(out).all()
    model.eval()
    assert model(x).shape == (3, k)
    expected = {
        "c1": expected_c1_params(k, cin, size),
        "c2": expected_c2_params(k, cin, size),
        "ResNet": expected_resnet_params(20, k, cin),
    }[arch]
    assert count_parameters(model) == expected
    assert model.config["arch"] == arch and model.config["num_classes"] == k


def test_fc_input_width_follows_input_size():
    assert C1(input_size=32).flat_features == 4096
    assert C1(in_channels=1, input_size=28).flat_features == 64 * 7 * 7
    assert C2(input_size=32).flat_features == 3200
    assert C2(in_channels=1, input_size=28).flat_features == 128 * 4 * 4
    # non-square input
    m = C2(input_size=(32, 40))
    assert m.flat_features == 128 * 5 * 7
    assert m(torch.randn(2, 3, 32, 40)).shape == (2, 10)


def test_hessianflow_layer_names_and_kinds():
    # HessianFlow's names in its order (models/c1.py); the function (ReLU before BatchNorm, the pools) is
    # checked against an independent definition in test_hessianflow_checkpoints.py
    conv, bn, fc = nn.Conv2d, nn.BatchNorm2d, nn.Linear
    assert [(n, type(m)) for n, m in C1().named_children()] == [
        ("conv1", conv), ("bn1", bn), ("conv2", conv), ("bn2", bn), ("fc1", fc), ("fc2", fc), ("fc3", fc)
    ]  # fmt: skip
    assert [n for n, _ in C2().named_children()] == [
        "conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "conv4", "bn4", "fc1", "fc2", "fc3"
    ]  # fmt: skip
    assert all(m.padding == (0, 0) for m in C2().modules() if isinstance(m, nn.Conv2d))
    assert C1().conv1.padding == (2, 2) and C1().conv1.kernel_size == (5, 5)


def test_resnet_block_computes_residual():
    # With the residual branch zeroed (last BN weight 0), each block is relu(shortcut(x)); an identity
    # block is then relu(x), a check that the shortcut is added after the second BN.
    torch.manual_seed(0)
    model = ResNet(depth=8).eval()
    block = model.layer1[0]
    nn.init.zeros_(block.bn2.weight)
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(block(x), torch.relu(x))


@pytest.mark.parametrize("depth", [21, 7, 2, 0, -4, 20.0, "20", True])
def test_bad_resnet_depth_is_a_clear_error(depth):
    with pytest.raises(ValueError, match=r"6n\+2"):
        get_model("ResNet", depth=depth)
    with pytest.raises(ValueError, match=r"6n\+2"):
        resnet_num_blocks(depth)


def test_resnet_num_blocks():
    assert [resnet_num_blocks(d) for d in (8, 20, 32, 44, 56, 110)] == [1, 3, 5, 7, 9, 18]


def test_depth_is_ignored_by_small_cnns():
    assert count_parameters(get_model("c1", depth=7)) == 1_756_682


def test_architecture_names_are_case_insensitive():
    assert ARCHS == ("c1", "c2", "ResNet")
    for spelling, canon, cls in (("ResNet", "ResNet", ResNet), ("resnet", "ResNet", ResNet),
                                 ("RESNET", "ResNet", ResNet), ("c1", "c1", C1), ("C1", "c1", C1),
                                 ("C2", "c2", C2), (" c2 ", "c2", C2)):  # fmt: skip
        assert canonical_arch(spelling) == canon
        assert type(get_model(spelling)) is cls


@pytest.mark.parametrize("name", ["resnet20", "vgg", "", None, 3])
def test_unknown_architecture_lists_valid_names(name):
    with pytest.raises(ValueError, match="c1, c2, ResNet"):
        get_model(name)
    with pytest.raises(ValueError, match="unknown architecture"):
        canonical_arch(name)


def test_bad_shapes_and_sizes_are_errors():
    with pytest.raises(ValueError, match="too small for C2"):
        C2(input_size=15)
    assert C2(input_size=16)(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(ValueError, match="num_classes"):
        get_model("c1", num_classes=0)
    with pytest.raises(ValueError, match="in_channels"):
        get_model("ResNet", in_channels=0)
    with pytest.raises(ValueError, match="input_size"):
        get_model("c1", input_size=(32, 32, 3))
    with pytest.raises(ValueError, match="input_size"):
        get_model("c2", input_size=0)


def test_count_parameters_trainable_only():
    model = get_model("ResNet", depth=8)
    model.fc.weight.requires_grad_(False)
    assert count_parameters(model) - count_parameters(model, trainable_only=True) == 64 * 10
