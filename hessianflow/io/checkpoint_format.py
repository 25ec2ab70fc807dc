"""What a hessianflow checkpoint holds, in one place: the format tag, the writer, the reader with its
validation, the model description and the rules for resuming a run.

:mod:`hessianflow.io.checkpoint` does the safe file I/O (atomic writes, ``weights_only`` loads) for any
object; this module says what the object of a training run is. The training scripts write it with
:func:`make_checkpoint`, the driver and ``--resume`` read it with :func:`read_checkpoint`, and a notebook
rebuilds the model of any checkpoint with :func:`load_model`::

    >>> import torch, hessianflow as hf
    >>> from hessianflow.training.models import get_model
    >>> ckpt = make_checkpoint(get_model("c1"), dataset="cifar10", epoch=3)
    >>> (ckpt["format"], ckpt["arch"], ckpt["num_classes"], ckpt["epoch"])
    ('hessianflow.checkpoint/1', 'c1', 10, 3)

Three kinds of file are read:

* this project's checkpoints (:data:`FORMAT`): the model is rebuilt from the description they carry;
* HessianFlow's own files, a bare ``torch.save(model.state_dict())`` with or without ``DataParallel``'s
  ``module.`` prefix: the models here have HessianFlow's parameter names, so they load as they are,
  given the architecture;
* bare state_dicts of this project's models as they were named before version 0.2 (``features.N``,
  ``classifier.N``, ``shortcut``): renamed by :func:`upgrade_state_dict`.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from .._checks import is_int
from ..training.models import canonical_arch, get_model
from ..training.models.cnn import pair
from .checkpoint import CheckpointError, extract_state_dict, load_checkpoint, versions

__all__ = [
    "FORMAT",
    "ModelSpec",
    "CHECKSUM_FIELD",
    "state_checksum",
    "make_checkpoint",
    "read_checkpoint",
    "verify_checksum",
    "upgrade_state_dict",
    "load_state_into",
    "load_model",
]

#: The tag of every checkpoint written by train.py / train_resnet.py.
FORMAT = "hessianflow.checkpoint/1"

#: The field holding :func:`state_checksum` of the checkpoint's state_dict (absent before 0.3).
CHECKSUM_FIELD = "state_dict_sha256"

# Field -> accepted types. _MODEL_FIELDS describe the model (needed to analyse it), _RUN_FIELDS the
# training state (needed to resume). "depth" may be None for c1/c2.
_MODEL_FIELDS = {"arch": str, "num_classes": int, "in_channels": int, "dataset": str, "epoch": int, "args": Mapping}
_RUN_FIELDS = {"optimizer": Mapping, "absa": Mapping, "rng": Mapping, "history": list}
_RECORD_INTS = ("batch_size", "large_ratio")


@dataclass(frozen=True)
class ModelSpec:
    """What rebuilds a model: the arguments of :func:`hessianflow.training.models.get_model` (``model.config``).

    Example:
        >>> from hessianflow.io.checkpoint_format import ModelSpec
        >>> spec = ModelSpec("ResNet", depth=8, num_classes=10)
        >>> spec.describe()
        'ResNet-8'
        >>> ModelSpec.of(spec.build()) == spec  # a model of hessianflow.training.models describes itself
        True
    """

    arch: str
    num_classes: int = 10
    in_channels: int = 3
    input_size: int | tuple = 32
    depth: int | None = None

    @classmethod
    def of(cls, model: nn.Module) -> ModelSpec:
        """The description a model carries in ``model.config``."""
        config = getattr(model, "config", None)
        if not isinstance(config, Mapping) or "arch" not in config:
            raise ValueError(f"{type(model).__name__} has no model.config with an 'arch': not a hessianflow model")
        arch = canonical_arch(config["arch"])
        return cls(
            arch=arch,
            num_classes=int(config["num_classes"]),
            in_channels=int(config["in_channels"]),
            input_size=config["input_size"],
            depth=int(config["depth"]) if arch == "ResNet" else None,
        )

    def build(self) -> nn.Module:
        """The (randomly initialised) model."""
        return get_model(
            self.arch, depth=self.depth or 20, num_classes=self.num_classes, in_channels=self.in_channels,
            input_size=self.input_size,
        )  # fmt: skip

    def describe(self) -> str:
        """``ResNet-20`` or ``c1``."""
        return f"ResNet-{self.depth}" if self.arch == "ResNet" else self.arch


def state_checksum(state: Mapping) -> str:
    """The SHA-256 (hex) of a state_dict: each entry in key order, its name, dtype, shape and bytes.

    Computed on the CPU, on the bytes ``torch.save`` writes, so a checkpoint written on a GPU verifies on a
    CPU. torch's archive does not check its entries when loading: a flipped byte among the weights loads
    silently (one weight -0.008 -> 130.6, the top eigenvalue 71 -> 2607); this is the check.

    Example:
        >>> import torch
        >>> from hessianflow.io.checkpoint_format import state_checksum
        >>> a = {"w": torch.tensor([1.0, 2.0])}
        >>> state_checksum(a) == state_checksum({"w": torch.tensor([1.0, 2.0])})
        True
        >>> state_checksum(a) == state_checksum({"w": torch.tensor([1.0, 2.5])})
        False
    """
    digest = hashlib.sha256()
    for key, value in state.items():
        digest.update(f"{key}\0".encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}\0".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, whatever the dtype
        else:  # e.g. a module's extra state: its type only
            digest.update(f"{type(value).__name__}\0".encode())
    return digest.hexdigest()


def make_checkpoint(model: nn.Module, *, dataset: str, epoch: int, args: Mapping | None = None, **training):
    """The checkpoint of ``model`` after ``epoch`` epochs on ``dataset`` (a dict of plain types and tensors).

    Args:
        model: a model of :mod:`hessianflow.training.models` (or a ``DataParallel``/``DDP`` wrapper of one): its
            ``config`` and its state_dict (without wrapper prefixes) are stored, with the state_dict's
            :func:`state_checksum` (``state_dict_sha256``), which every reader verifies.
        dataset: the data set's name.
        epoch: epochs done.
        args: the run's settings (plain values only are kept).
        **training: the training state for ``--resume``: ``optimizer``, ``absa``, ``tracker``, ``rng``,
            ``history``, ``updates``, ``best_test_acc``, ``elapsed``.

    Example:
        >>> from hessianflow.io.checkpoint_format import ModelSpec, make_checkpoint
        >>> model = ModelSpec("ResNet", depth=8).build()
        >>> ckpt = make_checkpoint(model, dataset="cifar10", epoch=5, args={"lr": 0.1})
        >>> ckpt["arch"], ckpt["depth"], ckpt["epoch"], ckpt["args"]
        ('ResNet', 8, 5, {'lr': 0.1})
    """
    inner = getattr(model, "module", model)
    spec = ModelSpec.of(inner)
    plain = (int, float, str, bool, list, type(None))
    state = extract_state_dict({"state_dict": inner.state_dict()})
    return {
        "format": FORMAT,
        "state_dict": state,
        CHECKSUM_FIELD: state_checksum(state),
        **asdict(spec),
        "dataset": dataset,
        "args": {k: v for k, v in (args or {}).items() if isinstance(v, plain)},
        "versions": versions(),
        "epoch": int(epoch),
        **training,
    }


def _field_error(path, field: str, problem: str) -> CheckpointError:
    return CheckpointError(f"cannot use checkpoint {path}: its field {field!r} {problem}")


def _check_fields(ckpt: Mapping, fields: Mapping, path) -> None:
    for field, kind in fields.items():
        if field not in ckpt:
            raise _field_error(path, field, "is missing")
        value = ckpt[field]
        if not (is_int(value) if kind is int else isinstance(value, kind)):
            raise _field_error(path, field, f"should be a {kind.__name__}, got {type(value).__name__} {value!r:.40}")


def _check_description(ckpt: Mapping, path) -> None:
    """What the field types do not say: the checksum is a digest, the input size a size, the run's data
    set (``args["name"]``) the checkpoint's ``dataset``."""
    if CHECKSUM_FIELD in ckpt:
        digest = ckpt[CHECKSUM_FIELD]
        if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise _field_error(path, CHECKSUM_FIELD, f"is not a SHA-256 digest: {digest!r:.40}")
    try:
        pair(ckpt.get("input_size", 32))
    except ValueError as exc:
        raise _field_error(path, "input_size", f"is not an input size ({exc})") from None
    name = ckpt["args"].get("name")
    if name is not None and name != ckpt["dataset"]:
        raise _field_error(path, "args", f"name {name!r} contradicts its field 'dataset' {ckpt['dataset']!r}")


def verify_checksum(ckpt, state: Mapping, path) -> str | None:
    """Check the model's ``state`` (as :func:`read_checkpoint` returns it) against the checksum saved with it.

    Returns:
        ``None`` when they agree (or for a bare state_dict, which never had one), or a note to show when
        the checkpoint predates the checksum: it loads, unverified.

    Raises:
        CheckpointError: the weights differ from those written (a damaged or edited file), one line
            naming the file.
    """
    if not (isinstance(ckpt, Mapping) and "format" in ckpt):
        return None
    if CHECKSUM_FIELD not in ckpt:
        return f"note: {path} has no checksum (written by hessianflow 0.2 or older): its weights are not verified"
    if state_checksum(state) != ckpt[CHECKSUM_FIELD]:
        raise CheckpointError(
            f"cannot use checkpoint {path}: its weights do not match the checksum written with them "
            "(the file was damaged or edited after it was saved)"
        )
    return None


def read_checkpoint(path, purpose: str = "analyse"):
    """Load and validate a checkpoint file.

    Args:
        path: the file.
        purpose: ``"analyse"`` (the model description must be whole) or ``"resume"`` (the training
            state too, and a bare state_dict is refused).

    Returns:
        ``(ckpt, spec, state)``: the loaded object, its :class:`ModelSpec` (``None`` for a bare
        state_dict) and the model's state_dict (prefixes stripped, legacy names not yet upgraded, not yet
        checked against its checksum: :func:`verify_checksum`, once it is known to fit the model).

    Raises:
        CheckpointError: a missing, corrupt or code-carrying file, an unknown format, or a field that is
            missing or of the wrong type (one line naming the file and the field).

    Example:
        >>> import os, tempfile
        >>> from hessianflow.io.checkpoint import save_checkpoint
        >>> from hessianflow.io.checkpoint_format import ModelSpec, make_checkpoint, read_checkpoint
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
        >>> _ = save_checkpoint(make_checkpoint(ModelSpec("c1").build(), dataset="cifar10", epoch=1), path)
        >>> ckpt, spec, state = read_checkpoint(path)
        >>> spec.describe(), ckpt["dataset"], "fc3.weight" in state
        ('c1', 'cifar10', True)
    """
    ckpt = load_checkpoint(path)
    full = isinstance(ckpt, Mapping) and "format" in ckpt
    if not full:
        if purpose == "resume":
            raise CheckpointError(
                f"{path} is not a training checkpoint of train.py/train_resnet.py (a bare state_dict cannot be "
                "resumed; analyse it with hessian_eig_driver.py)"
            )
        return ckpt, None, extract_state_dict(ckpt)
    if ckpt["format"] != FORMAT:
        raise CheckpointError(
            f"cannot load checkpoint {path}: unknown format {ckpt['format']!r} (this version reads {FORMAT})"
        )
    _check_fields(ckpt, _MODEL_FIELDS, path)
    _check_description(ckpt, path)
    if purpose == "resume":
        _check_fields(ckpt, _RUN_FIELDS, path)
        # the records a resumed run reads back (the effective batch of the last epoch)
        for record in ckpt["history"]:
            if not (isinstance(record, Mapping) and all(is_int(record.get(k)) for k in _RECORD_INTS)):
                raise _field_error(path, "history", f"holds a record without integer {' and '.join(_RECORD_INTS)}")
    try:
        arch = canonical_arch(ckpt["arch"])
    except ValueError as exc:
        raise _field_error(path, "arch", f"is not a known architecture ({exc})") from None
    for field in ("num_classes", "in_channels", "epoch"):
        if ckpt[field] < (0 if field == "epoch" else 1):
            raise _field_error(path, field, f"is out of range: {ckpt[field]}")
    depth = ckpt.get("depth")
    if arch == "ResNet" and (not is_int(depth) or depth < 8 or (depth - 2) % 6):
        raise _field_error(path, "depth", f"should be a ResNet depth 6n+2, got {depth!r}")
    spec = ModelSpec(
        arch=arch,
        num_classes=ckpt["num_classes"],
        in_channels=ckpt["in_channels"],
        input_size=ckpt.get("input_size", 32),
        depth=depth if arch == "ResNet" else None,
    )
    return ckpt, spec, extract_state_dict(ckpt)


# This project's names before version 0.2, when C1/C2 were nn.Sequential blocks: Sequential index ->
# HessianFlow's name (ReLUs and pools have no parameters, hence the gaps).
_LEGACY_NAMES = {
    "c1": {"features.0": "conv1", "features.2": "bn1", "features.4": "conv2", "features.6": "bn2",
           "classifier.0": "fc1", "classifier.2": "fc2", "classifier.4": "fc3"},
    "c2": {"features.0": "conv1", "features.2": "bn1", "features.3": "conv2", "features.5": "bn2",
           "features.7": "conv3", "features.9": "bn3", "features.10": "conv4", "features.12": "bn4",
           "classifier.0": "fc1", "classifier.2": "fc2", "classifier.4": "fc3"},
}  # fmt: skip


def upgrade_state_dict(state: Mapping, arch: str) -> OrderedDict:
    """Rename the keys of a state_dict saved by this project before version 0.2 to the current names.

    Current (and HessianFlow's) names pass through unchanged.

    >>> list(upgrade_state_dict({"features.0.weight": 1, "classifier.4.bias": 2}, "c1"))
    ['conv1.weight', 'fc3.bias']
    >>> list(upgrade_state_dict({"layer2.0.shortcut.1.running_var": 3}, "ResNet"))
    ['layer2.0.downsample.1.running_var']
    """
    arch = canonical_arch(arch)
    out = OrderedDict()
    for key, value in state.items():
        if arch == "ResNet":
            key = re.sub(r"\.shortcut\.", ".downsample.", key)
        else:
            module, dot, rest = key.rpartition(".")
            key = _LEGACY_NAMES[arch].get(module, module) + dot + rest
        out[key] = value
    return out


def _shape(t) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]" if isinstance(t, torch.Tensor) else type(t).__name__


def load_state_into(model: nn.Module, state: Mapping, path, desc: str, hint: str) -> None:
    """Load ``state`` into ``model`` or raise a one-line :class:`CheckpointError` naming the mismatch."""
    expected = model.state_dict()
    # BatchNorm's num_batches_tracked (PyTorch >= 0.4.1) is absent from older files and unused in eval mode.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        (k, v)
        for k, v in state.items()
        if k in expected and (not isinstance(v, torch.Tensor) or v.shape != expected[k].shape)
    ]

    def some(keys):
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {some(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {some(unexpected)}")
    if wrong:
        k, v = wrong[0]
        problems.append(
            f"{len(wrong)} shape mismatch(es), the first: {k} is {_shape(v)} in the checkpoint, "
            f"{_shape(expected[k])} in the model"
        )
    if problems:
        raise CheckpointError(f"{path} does not fit {desc}: " + "; ".join(problems) + f" ({hint})")
    model.load_state_dict(state, strict=False)


def _resnet_depth_of(state: Mapping) -> int | None:
    """The depth 6n+2 of a CIFAR ResNet state_dict, from the number of blocks in its first stage."""
    blocks = {int(m.group(1)) for k in state for m in [re.match(r"layer1\.(\d+)\.", k)] if m}
    return 6 * (max(blocks) + 1) + 2 if blocks else None


def load_model(path, spec: ModelSpec | None = None, *, arch=None, depth=None, log=None):
    """The model of a checkpoint file, with its weights, and what is known about it.

    Args:
        path: a checkpoint of this project (its own description rebuilds the model), or a bare
            state_dict (HessianFlow's files among them), which needs ``spec`` or ``arch``.
        spec: for a bare state_dict: the model (classes and input shape of its data set).
        arch, depth: for a bare state_dict without ``spec``: the architecture (10 classes, 3x32x32
            inputs); a ResNet's depth is read off the state_dict when not given. For a checkpoint of
            this project they must match its description, when given.
        log: called with a note when something was inferred.

    Returns:
        ``(model, spec, ckpt)``: the model in eval mode on the CPU, its :class:`ModelSpec` and the
        loaded object (``ckpt`` is the bare state_dict for such files).

    Raises:
        CheckpointError: an unusable file, one that does not fit the model, or one whose weights differ
            from the checksum saved with them (one line). A checkpoint without a checksum (hessianflow
            0.2 and older) loads, and ``log`` gets a note.

    Example:
        >>> import os, tempfile, torch
        >>> from hessianflow.io.checkpoint import save_checkpoint
        >>> from hessianflow.io.checkpoint_format import ModelSpec, load_model, make_checkpoint
        >>> _ = torch.manual_seed(0)
        >>> trained = ModelSpec("ResNet", depth=8).build()
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
        >>> _ = save_checkpoint(make_checkpoint(trained, dataset="cifar10", epoch=1), path)
        >>> model, spec, _ = load_model(path)  # no flag needed: the checkpoint describes its model
        >>> spec.describe(), model.training, torch.equal(model.fc.weight, trained.fc.weight)
        ('ResNet-8', False, True)
    """
    ckpt, saved, state = read_checkpoint(path)
    if saved is not None:
        if arch is not None and canonical_arch(arch) != saved.arch:
            raise CheckpointError(
                f"--arch {arch} does not match {path}, which holds a {saved.describe()} "
                "(--arch is only needed for a bare state_dict; leave it out)"
            )
        if depth is not None and (saved.arch != "ResNet" or depth != saved.depth):
            raise CheckpointError(
                f"--depth {depth} does not match {path}, which holds a {saved.describe()} "
                "(--depth is only needed for a bare state_dict of a ResNet; leave it out)"
            )
        spec, hint = saved, "the checkpoint's own description is inconsistent with its weights"
    else:
        if spec is None and arch is None:
            raise CheckpointError(
                f"{path} is a bare state_dict without a model description: pass --arch (c1, c2, ResNet) "
                "and --name for the data set it was trained on"
            )
        spec = spec or ModelSpec(arch=canonical_arch(arch))
        if spec.arch == "ResNet" and depth is None and spec.depth is None:
            found = _resnet_depth_of(state)  # None when the file holds no ResNet: loading it then fails
            depth = found or 20
            if found and log is not None:
                log(f"note: --depth not given; ResNet-{depth} read off the state_dict")
        spec = replace(spec, depth=(depth or spec.depth) if spec.arch == "ResNet" else None)
        hint = "check --arch, --depth and --name"
    try:
        model = spec.build()
    except ValueError as exc:  # e.g. an input too small for the architecture's layers
        raise CheckpointError(
            f"cannot use checkpoint {path}: no {spec.describe()} fits its description: {exc}"
        ) from None
    desc = f"a {spec.describe()} with {spec.num_classes} classes"
    load_state_into(model, upgrade_state_dict(state, spec.arch), path, desc, hint)
    # after the fit: a file whose shapes are wrong is better described by the mismatch than by the checksum
    note = verify_checksum(ckpt, state, path)
    if note is not None and log is not None:
        log(note)
    return model.eval(), spec, ckpt
