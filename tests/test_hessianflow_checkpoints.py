"""HessianFlow's own checkpoints load as they are.

The networks below are written out from HessianFlow's model definitions (its models/c1.py and
models/resnet.py: the layer names, their order and the forward computation), independently of
hessianflow.training.models. Their state_dicts, saved as HessianFlow saved them (``torch.save(model.state_dict())``,
with or without DataParallel's ``module.`` prefix), must load into the driver by name and give the same
logits and the same top Hessian eigenvalue as the original network. This project's own pre-0.2 layout
(``features.N`` / ``classifier.N`` / ``shortcut``) keeps loading through a tested key map.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessianflow.cli import eig as drv
from hessianflow.cli.common import run as run_cli
from hessianflow.curvature import HessianOperator
from hessianflow.io.checkpoint_format import load_model, upgrade_state_dict
from hessianflow.linalg.eigen import lanczos
from hessianflow.training.data import fixed_batch, get_datasets
from hessianflow.training.models import get_model

SYN = ["--name", "synthetic", "--synthetic-train", "64", "--synthetic-test", "32"]
BATCH, SEED = 16, 1


class OriginalC1(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 5, 1, 2)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, 5, 1, 2)
        self.bn2 = nn.BatchNorm2d(64)
        self.fc1 = nn.Linear(64 * 8 * 8, 384)
        self.fc2 = nn.Linear(384, 192)
        self.fc3 = nn.Linear(192, num_classes)

    def forward(self, x):
        x = F.max_pool2d(self.bn1(F.relu(self.conv1(x))), 3, 2, 1)
        x = F.max_pool2d(self.bn2(F.relu(self.conv2(x))), 3, 2, 1)
        x = x.view(x.size(0), -1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class OriginalC2(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64)
        self.conv2, self.bn2 = nn.Conv2d(64, 64, 3), nn.BatchNorm2d(64)
        self.conv3, self.bn3 = nn.Conv2d(64, 128, 3), nn.BatchNorm2d(128)
        self.conv4, self.bn4 = nn.Conv2d(128, 128, 3), nn.BatchNorm2d(128)
        self.conv_drop = nn.Dropout2d()  # defined, never applied (as in HessianFlow)
        self.fc1, self.fc2, self.fc3 = nn.Linear(128 * 5 * 5, 256), nn.Linear(256, 256), nn.Linear(256, 10)
        self.drop = nn.Dropout()

    def forward(self, x):
        x = self.bn1(F.relu(self.conv1(x)))
        x = F.max_pool2d(self.bn2(F.relu(self.conv2(x))), 2)
        x = self.bn3(F.relu(self.conv3(x)))
        x = F.max_pool2d(self.bn4(F.relu(self.conv4(x))), 2)
        x = x.view(-1, 128 * 5 * 5)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class OriginalBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class OriginalResNet(nn.Module):
    """HessianFlow's CIFAR ResNet with basic blocks (its choice below depth 44)."""

    def __init__(self, depth=20, num_classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n)
        self.layer2 = self._make_layer(32, n, 2)
        self.layer3 = self._make_layer(64, n, 2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64, num_classes)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [OriginalBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [OriginalBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(self.avgpool(x).view(x.size(0), -1))


def trained_like(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and BatchNorm statistics away from their initial values (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif t.is_floating_point():
                t.add_(0.05 * torch.randn(t.shape, generator=g))
    return model.eval()


ORIGINALS = {
    "c1": (lambda: OriginalC1(), {}),
    "c2": (lambda: OriginalC2(), {}),
    "ResNet": (lambda: OriginalResNet(depth=20), {"depth": 20}),
}


@pytest.fixture(scope="module")
def batch():
    _, plain, _ = get_datasets("synthetic", augment=False, seed=SEED, num_train=64, num_test=32)
    return fixed_batch(plain, BATCH, seed=SEED)


@pytest.mark.parametrize("prefix", ["", "module."])
@pytest.mark.parametrize("arch", sorted(ORIGINALS))
def test_original_checkpoints_give_the_original_logits(arch, prefix, tmp_path, batch):
    build, kw = ORIGINALS[arch]
    original = trained_like(build(), seed=3)
    path = tmp_path / "model_param.pkl"
    torch.save({prefix + k: v for k, v in original.state_dict().items()}, path)  # HessianFlow's own save
    model, spec, _ = load_model(path, arch=arch)
    assert spec.arch == arch and spec.depth == kw.get("depth")
    x = batch[0]
    with torch.no_grad():
        ours, theirs = model(x), original(x)
    # the same functions of the same weights: c1/c2 to float32 rounding, ResNet (another order of the
    # residual addition and the pooling) within a few ulps of the logits
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-5 * theirs.abs().max().item()), (ours - theirs).abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["c1", "ResNet"])
def test_driver_top_eigenvalue_of_an_original_checkpoint(arch, tmp_path, capsys, batch):
    build, _ = ORIGINALS[arch]
    original = trained_like(build(), seed=4)
    path = tmp_path / "hf.pkl"
    torch.save({"module." + k: v for k, v in original.state_dict().items()}, path)
    jpath = tmp_path / "eig.json"
    argv = ["--resume", str(path), "--arch", arch, *SYN, "--hessian-batch-size", str(BATCH), "--seed", str(SEED),
            "--top-k", "1", "--json", str(jpath), "--device", "cpu", "--no-progress"]  # fmt: skip
    assert run_cli(drv.main, drv.parse_args, argv) == 0
    got = json.loads(jpath.read_text())["eigen"]["eigenvalues"][0]
    # the reference: the original network's weights loaded by name into hessianflow's model, on the same batch
    ours = get_model(arch, depth=20)
    ours.load_state_dict(original.state_dict())
    ref = lanczos(HessianOperator(ours.eval(), nn.CrossEntropyLoss(), data=batch), k=1, tol=1e-6, seed=0)
    assert math.isclose(got, float(ref.eigenvalues[0]), rel_tol=1e-4), (got, ref.eigenvalues)
    assert got > 0


# This project's names before 0.2, written out from its old nn.Sequential layout (the test's own map).
OLD_NAMES = {
    "c1": ["features.0", "features.2", "features.4", "features.6", "classifier.0", "classifier.2", "classifier.4"],
    "c2": ["features.0", "features.2", "features.3", "features.5", "features.7", "features.9", "features.10",
           "features.12", "classifier.0", "classifier.2", "classifier.4"],
}  # fmt: skip


@pytest.mark.parametrize("arch", ["c1", "c2", "ResNet"])
def test_this_projects_old_layout_still_loads(arch, tmp_path, batch):
    model = trained_like(get_model(arch, depth=8), seed=5)
    state = model.state_dict()
    if arch == "ResNet":
        old = {k.replace(".downsample.", ".shortcut."): v for k, v in state.items()}
        assert any(".shortcut." in k for k in old)
    else:
        modules = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in state))  # registration order
        rename = dict(zip(modules, OLD_NAMES[arch]))
        old = {rename[k.rsplit(".", 1)[0]] + "." + k.rsplit(".", 1)[1]: v for k, v in state.items()}
    assert list(upgrade_state_dict(old, arch)) == list(state)
    path = tmp_path / "old.pkl"
    torch.save(old, path)
    loaded, _, _ = load_model(path, arch=arch, depth=8 if arch == "ResNet" else None)
    with torch.no_grad():
        assert torch.equal(loaded(batch[0]), model(batch[0]))


def test_a_checkpoint_of_another_model_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "c1.pkl"
    torch.save(OriginalC1().state_dict(), path)
    code = run_cli(drv.main, drv.parse_args, ["--resume", str(path), "--arch", "ResNet", *SYN, "--device", "cpu"])
    err = capsys.readouterr()
    assert code == 2 and "does not fit a ResNet-20" in err.err and len(err.err.strip().splitlines()) == 1
    assert "read off the state_dict" not in err.out  # no ResNet depth can be read off a C1's keys
