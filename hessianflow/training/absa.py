"""ABSA: adaptive batch size with adversarial training.

Yao, Gholami, Arfeen, Liaw, Gonzalez, Keutzer and Mahoney (2018), "Large batch size training of neural
networks with adversarial training and second-order information", arXiv:1810.01021; the reference
implementation is HessianFlow's ``hessianflow/optimizer/absa.py``.

The idea: start with small batches; after every epoch, estimate the top eigenvalue of the loss Hessian.
When it has fallen to half of its value at the last change (the landscape got flatter), double the
batch (here: the number of mini-batches accumulated per optimizer step, ``large_ratio``), scale the
learning rate by the same factor (linear scaling) and halve the fraction of FGSM adversarial examples,
which regularise large-batch training against sharp minima. Adversarial training stops at the
maximal batch and, in any case, after half of the epochs.

Two independent parts:

- :class:`ABSAController` holds the schedule. It knows nothing about models or Hessians: the caller
  computes the eigenvalue (e.g. with :mod:`hessianflow.linalg.eigen`) and passes it to
  :meth:`ABSAController.end_of_epoch`.
- :func:`~hessianflow.training.loop.train_epoch` / :func:`~hessianflow.training.loop.evaluate`
  (:mod:`hessianflow.training.loop`) are the training and test loops it drives.

Typical use::

    ctl = ABSAController(large_ratio_cap=128, base_lr=0.1, lr_decay_epochs=[30, 60, 80], epochs=90)
    optimizer = torch.optim.SGD(model.parameters(), lr=ctl.lr(0), momentum=0.9)
    for epoch in range(ctl.epochs):                       # epochs are 0-based
        set_lr(optimizer, ctl.lr(epoch))
        train_epoch(model, train_loader, optimizer, criterion, ctl.large_ratio,
                    adv_ratio=ctl.current_adv_ratio(epoch), eps=eps, clamp=clamp, epoch=epoch)
        eig = None
        if ctl.needs_eigenvalue(epoch):
            H = HessianOperator(model, criterion, data=hessian_batch)   # hessianflow.curvature
            eig = power_iteration(H, k=1, seed=epoch).eigenvalues[0].item()  # hessianflow.linalg.eigen
        decision = ctl.end_of_epoch(epoch, eig)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from .._checks import check_int, check_positive
from ..linalg.linop import NonFiniteError

__all__ = ["ABSAController", "Decision"]

# HessianFlow's ``decay_ratio = 2``: the eigenvalue must halve to trigger growth, and the batch doubles.
_GROWTH = 2
_REASONS = ("first", "eigen_drop", "duration", "none", "capped")


@dataclass
class Decision:
    """What :meth:`ABSAController.end_of_epoch` decided after one epoch.

    Attributes:
        epoch: the (0-based) epoch that just ended.
        grew: whether the batch grew.
        factor: the growth factor of the batch and of the learning rate (1.0 when it did not grow;
            less than 2 when the cap clipped the doubling).
        reason: ``"first"`` (the first eigenvalue became the reference), ``"eigen_drop"`` (the
            eigenvalue fell to at most half the reference), ``"duration"`` (no such drop for
            ``duration`` checks), ``"none"`` (checked, no change) or ``"capped"`` (no check: the batch is
            at its cap, or the method is plain SGD).
        large_ratio: the number of accumulated mini-batches per step for the next epoch.
        lr: the learning rate for the next epoch (``epoch + 1``).
        eigenvalue: the eigenvalue passed in (``None`` when none was).
        reference: the reference eigenvalue after the decision.
        adv_ratio: the adversarial fraction for the next epoch.

    Example:
        >>> from hessianflow import ABSAController
        >>> ctl = ABSAController(large_ratio_cap=4, base_lr=0.1, epochs=10)
        >>> _ = ctl.end_of_epoch(0, eigenvalue=10.0)
        >>> decision = ctl.end_of_epoch(1, eigenvalue=4.0)
        >>> decision.grew, decision.factor, decision.large_ratio, decision.lr
        (True, 2.0, 2, 0.2)
        >>> decision.to_dict()["reason"]
        'eigen_drop'
    """

    epoch: int
    grew: bool
    factor: float
    reason: str
    large_ratio: int
    lr: float
    eigenvalue: float | None
    reference: float | None
    adv_ratio: float

    def to_dict(self) -> dict:
        return asdict(self)


class ABSAController:
    """The ABSA batch-size, learning-rate and adversarial-ratio schedule (Yao et al. 2018).

    Epochs are **0-based** throughout (``for epoch in range(epochs)``): :meth:`lr`,
    :meth:`current_adv_ratio` and :meth:`needs_eigenvalue` are asked about the epoch about to be
    trained, :meth:`end_of_epoch` is told about the epoch that just ended, and its decision applies
    from ``epoch + 1``. This reproduces HessianFlow's 1-based loop exactly (see below).

    The rules, following HessianFlow's ``absa`` (defaults from there and from the paper's README
    command ``--lr-decay 0.2 --large-ratio 128``):

    - **Eigenvalue checks.** While ``large_ratio < large_ratio_cap`` (method ``"absa"``), every
      epoch ends with a check. The first eigenvalue becomes the ``reference``. When an eigenvalue is
      at most ``reference / 2`` (a positive reference is required: the halving test means nothing for
      a non-positive one) the batch grows and the reference becomes that eigenvalue.
    - **Growth.** ``large_ratio`` doubles, clipped at the cap (``factor = min(2, cap / current)``,
      e.g. 2 -> 3 is a factor 1.5); the learning rate is multiplied by ``factor`` (linear scaling);
      the adversarial ratio is halved; the counter of checks since the last change is reset.
    - **Duration fallback.** ``epochs_since_change`` counts the checks since the last growth,
      including the one that set the first reference. When it reaches ``duration`` without an
      eigenvalue drop, the batch grows anyway: so the initial batch is used for at most ``duration``
      epochs, and each later one for at most ``duration`` epochs. As in HessianFlow, this growth
      also halves the adversarial ratio and scales the learning rate, but it does **not** move the
      reference eigenvalue (only a measured drop does). ``duration=None`` disables the fallback
      (HessianFlow's ``duration=False``).
    - **Cap.** On reaching ``large_ratio_cap``, checks stop and adversarial training stops for good.
      A cap of 1 means plain small-batch training without checks and without adversarial examples.
      (HessianFlow with a cap of 1 kept its adversarial ratio for the first half of training and
      crashed when printing; here "at the cap, no adversarial training" holds uniformly.)
    - **Half-way stop.** Adversarial training stops for good from epoch ``max(epochs // 2, 1)``
      (0-based) on; so it runs during the first ``epochs // 2`` epochs (at least one), which is what
      HessianFlow's ``if epoch >= epochs // 2: adv_ratio = 0`` at the end of 1-based epoch ``epoch``
      amounts to.
    - **Learning rate.** ``lr(epoch) = base_lr * (large_ratio / initial_ratio) *
      lr_decay ** #{d in lr_decay_epochs : d <= epoch}``: an entry ``d`` means "the decayed rate
      applies from 0-based epoch ``d``", i.e. after ``d`` epochs, matching HessianFlow's decay at the
      end of 1-based epoch ``d``.
    - **Method "sgd".** The large-batch baseline: ``large_ratio`` is the cap from the start
      (``initial_ratio = cap``, so ``base_lr`` is the rate at that batch), no checks, and no
      adversarial training (the baseline in the paper is plain SGD).

    Args:
        large_ratio_cap: the maximal number of mini-batches accumulated per optimizer step
            (HessianFlow's ``--large-ratio``; the README's ABSA command uses 128).
        base_lr: the learning rate at the initial ratio (1 for ABSA, the cap for SGD).
        lr_decay: the multiplicative decay (HessianFlow's README: 0.2).
        lr_decay_epochs: the 0-based epochs from which each decay applies (e.g. ``[30, 60, 80]``).
        epochs: the total number of epochs (for the half-way stop of adversarial training).
        adv_ratio: the initial fraction of each mini-batch replaced by FGSM examples (0.2).
        duration: the number of checks without a drop after which the batch grows anyway (10, as
            HessianFlow's ``duration=True``), or ``None``.
        method: ``"absa"`` or ``"sgd"``.

    Example:
        >>> from hessianflow import ABSAController
        >>> ctl = ABSAController(large_ratio_cap=4, base_lr=0.1, epochs=10)
        >>> ctl.large_ratio, ctl.lr(0), ctl.current_adv_ratio(0), ctl.needs_eigenvalue(0)
        (1, 0.1, 0.2, True)
        >>> ctl.end_of_epoch(0, eigenvalue=10.0).reason  # the first eigenvalue is the reference
        'first'
        >>> ctl.end_of_epoch(1, eigenvalue=4.0).reason  # below half of it: the batch doubles
        'eigen_drop'
        >>> ctl.large_ratio, ctl.lr(2), ctl.current_adv_ratio(2)  # linear lr scaling, half the FGSM share
        (2, 0.2, 0.1)
    """

    def __init__(
        self,
        *,
        large_ratio_cap: int = 128,
        base_lr: float,
        lr_decay: float = 0.2,
        lr_decay_epochs: Sequence[int] = (),
        epochs: int,
        adv_ratio: float = 0.2,
        duration: int | None = 10,
        method: str = "absa",
    ):
        self.large_ratio_cap = check_int("large_ratio_cap", large_ratio_cap, minimum=1)
        self.base_lr = check_positive("base_lr", base_lr)
        self.lr_decay = check_positive("lr_decay", lr_decay)
        self.lr_decay_epochs = sorted(check_int("each of lr_decay_epochs", d, minimum=0) for d in lr_decay_epochs)
        self.epochs = check_int("epochs", epochs, minimum=1)
        adv_ratio = float(adv_ratio)
        if not 0.0 <= adv_ratio <= 1.0:
            raise ValueError(f"adv_ratio must lie in [0, 1], got {adv_ratio}")
        self.initial_adv_ratio = adv_ratio
        self.duration = None if duration is None else check_int("duration", duration, minimum=1)
        if method not in ("absa", "sgd"):
            raise ValueError(f"method must be 'absa' or 'sgd', got {method!r}")
        self.method = method
        self.initial_ratio = 1 if method == "absa" else self.large_ratio_cap

        self.large_ratio = self.initial_ratio
        self.reference: float | None = None
        self.epochs_since_change = 0
        self.adv_ratio = adv_ratio if method == "absa" else 0.0
        self.adv_stopped = method == "sgd"
        self.last_epoch: int | None = None
        self.history: list[Decision] = []
        if self.large_ratio >= self.large_ratio_cap:
            self._stop_adversarial()

    # -- queries -------------------------------------------------------------------------------
    @property
    def adv_stop_epoch(self) -> int:
        """The 0-based epoch from which adversarial training is off for good (half-way)."""
        return max(self.epochs // 2, 1)

    def lr(self, epoch: int) -> float:
        """The learning rate for (0-based) ``epoch`` at the current ``large_ratio``."""
        epoch = check_int("epoch", epoch, minimum=0)
        decays = sum(1 for d in self.lr_decay_epochs if d <= epoch)
        return self.base_lr * (self.large_ratio / self.initial_ratio) * self.lr_decay**decays

    def needs_eigenvalue(self, epoch: int) -> bool:
        """Whether :meth:`end_of_epoch` for ``epoch`` needs an eigenvalue (the batch can still grow)."""
        check_int("epoch", epoch, minimum=0)
        return self.method == "absa" and self.large_ratio < self.large_ratio_cap

    def current_adv_ratio(self, epoch: int) -> float:
        """The fraction of each mini-batch to replace by FGSM examples during (0-based) ``epoch``.

        0 for method ``"sgd"``, at the cap, and from :attr:`adv_stop_epoch` on.
        """
        epoch = check_int("epoch", epoch, minimum=0)
        if self.adv_stopped or self.large_ratio >= self.large_ratio_cap or epoch >= self.adv_stop_epoch:
            return 0.0
        return self.adv_ratio

    # -- the decision --------------------------------------------------------------------------
    def end_of_epoch(self, epoch: int, eigenvalue: float | None = None) -> Decision:
        """Record the end of (0-based) ``epoch`` and decide the batch size for the next one.

        Args:
            epoch: the epoch that just ended; must be larger than the previous call's.
            eigenvalue: the top Hessian eigenvalue measured at the end of the epoch; required when
                :meth:`needs_eigenvalue` is true, ignored (but recorded) otherwise.

        Returns:
            The :class:`Decision`, also appended to :attr:`history`.

        Raises:
            ValueError: a missing eigenvalue when one is needed, or an epoch not after the last one.
            NonFiniteError: a NaN or infinite eigenvalue (a ``ValueError``).
        """
        epoch = check_int("epoch", epoch, minimum=0)
        if self.last_epoch is not None and epoch <= self.last_epoch:
            raise ValueError(f"end_of_epoch({epoch}) after end_of_epoch({self.last_epoch}): epochs must increase")
        ev = None
        if eigenvalue is not None:
            ev = float(eigenvalue)
            if not math.isfinite(ev):
                raise NonFiniteError(
                    f"the Hessian eigenvalue at the end of epoch {epoch} is {ev}: the model or the loss "
                    "has diverged, or the eigensolver failed"
                )

        grew, factor, reason = False, 1.0, "capped"
        if self.needs_eigenvalue(epoch):
            if ev is None:
                raise ValueError(
                    f"end_of_epoch({epoch}) needs the top Hessian eigenvalue: the batch "
                    f"({self.large_ratio} of at most {self.large_ratio_cap} mini-batches) can still grow"
                )
            self.epochs_since_change += 1
            if self.reference is None:
                self.reference, reason = ev, "first"
            elif self.reference > 0 and ev <= self.reference / _GROWTH:
                self.reference, reason = ev, "eigen_drop"
                factor, grew = self._grow(), True
            else:
                reason = "none"
            if not grew and self.duration is not None and self.epochs_since_change >= self.duration:
                factor, grew, reason = self._grow(), True, "duration"

        if epoch + 1 >= self.adv_stop_epoch:
            self._stop_adversarial()
        self.last_epoch = epoch
        decision = Decision(
            epoch=epoch,
            grew=grew,
            factor=factor,
            reason=reason,
            large_ratio=self.large_ratio,
            lr=self.lr(epoch + 1),
            eigenvalue=ev,
            reference=self.reference,
            adv_ratio=self.current_adv_ratio(epoch + 1),
        )
        self.history.append(decision)
        return decision

    def _grow(self) -> float:
        old = self.large_ratio
        self.large_ratio = min(old * _GROWTH, self.large_ratio_cap)
        self.adv_ratio /= _GROWTH
        self.epochs_since_change = 0
        if self.large_ratio >= self.large_ratio_cap:
            self._stop_adversarial()
        return self.large_ratio / old

    def _stop_adversarial(self) -> None:
        self.adv_ratio = 0.0
        self.adv_stopped = True

    # -- checkpointing -------------------------------------------------------------------------
    def _config(self) -> dict:
        return {
            "large_ratio_cap": self.large_ratio_cap,
            "base_lr": self.base_lr,
            "lr_decay": self.lr_decay,
            "lr_decay_epochs": list(self.lr_decay_epochs),
            "epochs": self.epochs,
            "adv_ratio": self.initial_adv_ratio,
            "duration": self.duration,
            "method": self.method,
        }

    def state_dict(self) -> dict:
        """The configuration and state as plain Python types (loadable with ``weights_only=True``)."""
        return {
            "version": 1,
            "config": self._config(),
            "large_ratio": self.large_ratio,
            "reference": self.reference,
            "epochs_since_change": self.epochs_since_change,
            "adv_ratio": self.adv_ratio,
            "adv_stopped": self.adv_stopped,
            "last_epoch": self.last_epoch,
            "history": [d.to_dict() for d in self.history],
        }

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Restore a :meth:`state_dict`, so that training continues exactly where it stopped.

        Args:
            state: a dict from :meth:`state_dict`.
            strict: if true, refuse a state whose configuration (cap, learning-rate schedule, epochs,
                ...) differs from this controller's; if false, keep this controller's configuration
                and take only the state.
        """
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError("not an ABSAController state_dict (missing or unknown 'version')")
        config = state.get("config", {})
        if strict:
            mine = self._config()
            diff = {k: (config.get(k), v) for k, v in mine.items() if config.get(k) != v}
            if diff:
                detail = ", ".join(f"{k}: saved {a!r} vs {b!r}" for k, (a, b) in diff.items())
                raise ValueError(f"the saved ABSA configuration differs from this controller's ({detail})")
        try:
            large_ratio = int(state["large_ratio"])
            reference = None if state["reference"] is None else float(state["reference"])
            epochs_since_change = int(state["epochs_since_change"])
            adv_ratio = float(state["adv_ratio"])
            adv_stopped = bool(state["adv_stopped"])
            last_epoch = None if state["last_epoch"] is None else int(state["last_epoch"])
            history = [Decision(**d) for d in state["history"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed ABSAController state_dict: {exc}") from exc
        if not 1 <= large_ratio <= self.large_ratio_cap:
            raise ValueError(f"saved large_ratio {large_ratio} is outside [1, {self.large_ratio_cap}]")
        self.large_ratio = large_ratio
        self.reference = reference
        self.epochs_since_change = epochs_since_change
        self.adv_ratio = adv_ratio
        self.adv_stopped = adv_stopped
        self.last_epoch = last_epoch
        self.history = history

    def __repr__(self) -> str:
        return (
            f"ABSAController(method={self.method!r}, large_ratio={self.large_ratio}/{self.large_ratio_cap}, "
            f"reference={self.reference}, adv_ratio={self.adv_ratio}, epochs_since_change="
            f"{self.epochs_since_change})"
        )


# -- the loops ---------------------------------------------------------------------------------------
