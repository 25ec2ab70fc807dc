"""The loss forms of issue 10 (criterion, loss_fn, a model output's .loss), whole-data weights, the
analytic cross-entropy GGN, the empirical Fisher, glob/regex parameter selection, tied weights, and the
entry points that build operators. References: closed forms (logistic regression, least squares) and
``torch.func.hessian`` / ``jacrev`` on models without LayerNorm, in float64."""

from __future__ import annotations

import collections
import re
import types

import pytest
import torch
import torch.nn.functional as F
from dense_reference import dense_ggn, func_hessian_of, mlp
from torch import nn

import hessianflow as hf
from hessianflow.curvature import EmpiricalFisherOperator, GGNOperator, HessianOperator, resolve_params
from hessianflow.curvature.analysis import loss_landscape, per_layer
from hessianflow.curvature.batches import move_batch, split_samples
from hessianflow.curvature.hvp import flatten, unflatten
from hessianflow.curvature.losses import causal_lm_loss
from hessianflow.linalg.linop import NonFiniteError
from hessianflow.training.loop import evaluate, train_epoch
from hessianflow.training.tracking import top_eigenvalue

DT = torch.float64


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


class TinyLM(nn.Module):
    """A causal LM without LayerNorm (so torch.func.hessian is a valid reference): embedding, a tanh
    layer, a causal running mean over positions, a vocabulary head; HuggingFace-style output."""

    def __init__(self, vocab=11, d=4, tied=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.wte = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight
        self.double()

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = torch.tanh(self.mix(self.wte(input_ids)))  # [B, T, d]
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[:, None]
        logits = self.lm_head(h.cumsum(1) / steps)  # [B, T, V]
        loss = None
        if labels is not None:  # written out here, independently of hessianflow.curvature.losses
            lp = torch.log_softmax(logits[:, :-1], dim=-1)
            tgt = labels[:, 1:]
            keep = tgt != -100
            nll = -lp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            loss = (nll * keep).sum() / keep.sum()
        return types.SimpleNamespace(logits=logits, loss=loss)


def token_batches(vocab=11, seed=3):
    """Three padded batches of different lengths; padding labelled -100."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b, t, lengths in ((2, 5, (5, 3)), (3, 4, (4, 2, 3)), (1, 6, (4,))):
        ids = torch.randint(0, vocab, (b, t), generator=g)
        labels = ids.clone()
        mask = torch.zeros(b, t, dtype=torch.long)
        for i, n in enumerate(lengths):
            labels[i, n:] = -100
            mask[i, :n] = 1
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def counted(b):
    return (b["labels"][:, 1:] != -100).sum()


def mean_over_counted_tokens(call, batches):
    total, count = 0.0, 0
    for b in batches:
        logits = call(b["input_ids"])
        logits = getattr(logits, "logits", logits)
        lp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = b["labels"][:, 1:]
        keep = tgt != -100
        total = total - (lp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1) * keep).sum()
        count += int(keep.sum())
    return total / count


def logistic_data(n=30, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    y = (torch.rand(n, generator=g, dtype=DT) < 0.5).to(DT)
    return X, y


# -- the forms ---------------------------------------------------------------------------------


def test_loss_fn_and_criterion_forms_equal_the_logistic_closed_form():
    X, y = logistic_data()
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False).double()
    p = torch.sigmoid(X @ model.weight.detach()[0])
    closed = X.T @ (X * (p * (1 - p))[:, None]) / X.shape[0]  # X^T diag(p(1-p)) X / n
    bce = nn.BCEWithLogitsLoss()

    def fn(m, b):
        return F.binary_cross_entropy_with_logits(m(b["features"]["x"]).squeeze(-1), b["target"])

    batch = {"features": {"x": X, "note": "kept"}, "target": y}
    H_fn = HessianOperator(model, loss_fn=fn, data=batch).to_dense()
    H_crit = HessianOperator(model, lambda o, t: bce(o.squeeze(-1), t), data=(X, y)).to_dense()
    assert rel_err(H_fn, closed) < 1e-12 and rel_err(H_crit, closed) < 1e-12
    # over a loader, with reduction= (the function's mean is over samples): the same closed form
    loader = [{"features": {"x": X[a:b], "note": "kept"}, "target": y[a:b]} for a, b in ((0, 7), (7, 19), (19, 30))]
    H_loader = HessianOperator(model, loss_fn=fn, dataloader=loader, reduction="mean").to_dense()
    assert rel_err(H_loader, closed) < 1e-12
    # forward-over-reverse takes the same forms
    H_fr = HessianOperator(model, loss_fn=fn, data=batch, backend="forward_over_reverse").to_dense()
    assert rel_err(H_fr, closed) < 1e-12


def test_model_output_loss_form_and_its_errors():
    model = TinyLM()
    b = token_batches()[0]
    ref = func_hessian_of(model, lambda call: mean_over_counted_tokens(call, [b]))
    H = HessianOperator(model, data=b).to_dense()  # model(**b).loss
    assert rel_err(H, ref) < 1e-10

    # output["loss"] (a dict output), and a tuple batch called as model(*batch)
    class DictOut(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, labels):
            return {"loss": self.inner(input_ids, labels=labels).loss}

    H_dict = HessianOperator(DictOut(model), data=(b["input_ids"], b["labels"])).to_dense()
    assert rel_err(H_dict, ref) < 1e-10
    # the causal-LM helper recomputes the same loss from the logits
    assert rel_err(HessianOperator(model, loss_fn=causal_lm_loss, data=b).to_dense(), ref) < 1e-10
    nolabels = {k: v for k, v in b.items() if k != "labels"}
    with pytest.raises(ValueError, match=r"(?s)no \.loss.*criterion=.*loss_fn=.*\.loss") as info:
        HessianOperator(model, data=nolabels) @ torch.ones(sum(p.numel() for p in model.parameters()), dtype=DT)
    assert "causal_lm_loss" in str(info.value)


def test_padded_token_loader_is_the_mean_over_all_counted_tokens():
    model = TinyLM()
    batches = token_batches()
    ref = func_hessian_of(model, lambda call: mean_over_counted_tokens(call, batches))
    for kw in ({"loss_fn": causal_lm_loss}, {}):  # the helper, and the model's own .loss
        H = HessianOperator(model, dataloader=batches, batch_weight=counted, **kw)
        dense = H.to_dense()
        assert rel_err(dense, ref) < 1e-10, kw
        assert H.num_samples == sum(int(counted(b)) for b in batches) == 15  # (4 + 2) + (3 + 1 + 2) + 3
    # causal_lm_loss declares its units (the counted shifted labels): no batch_weight needed
    derived = HessianOperator(model, loss_fn=causal_lm_loss, dataloader=batches).to_dense()
    assert rel_err(derived, ref) < 1e-10
    # weighting by sequences instead of tokens is a different, wrong, operator: the test can tell
    by_rows = lambda b: b["input_ids"].shape[0]  # noqa: E731
    wrong = HessianOperator(model, loss_fn=causal_lm_loss, dataloader=batches, batch_weight=by_rows).to_dense()
    assert rel_err(wrong, ref) > 1e-3
    # the gradient is weighted the same way
    g = HessianOperator(model, loss_fn=causal_lm_loss, dataloader=batches, batch_weight=counted).gradient()
    theta = flatten([p.detach() for p in model.parameters()]).requires_grad_(True)
    base = [p.detach() for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]

    def loss(flat):
        ps = dict(zip(names, unflatten(flat, base)))
        return mean_over_counted_tokens(lambda *a: torch.func.functional_call(model, ps, a), batches)

    assert rel_err(g, torch.func.grad(loss)(theta.detach())) < 1e-12


def test_reduction_is_never_guessed_over_a_loader():
    model = mlp(3, 4, 3, seed=0)
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(20, 3, generator=g, dtype=DT), torch.randint(0, 3, (20,), generator=g)
    loader = [(X[:8], y[:8]), (X[8:], y[8:])]
    summed = lambda o, t: F.cross_entropy(o, t, reduction="sum")  # noqa: E731
    with pytest.raises(ValueError, match="reduction='mean'.*or reduction='sum'"):
        HessianOperator(model, summed, dataloader=loader)
    with pytest.raises(ValueError, match="reduction"):
        HessianOperator(model, loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]), dataloader=loader)
    with pytest.raises(ValueError, match="contradicts"):
        HessianOperator(model, nn.CrossEntropyLoss(), dataloader=loader, reduction="sum")
    H_sum = HessianOperator(model, summed, dataloader=loader, reduction="sum").to_dense()
    ref_sum = HessianOperator(model, nn.CrossEntropyLoss(reduction="sum"), data=(X, y)).to_dense()
    assert rel_err(H_sum, ref_sum) < 1e-12
    # one batch needs no reduction
    one = HessianOperator(model, summed, data=(X, y)).to_dense()
    assert rel_err(one, ref_sum) < 1e-12
    # the numbers, in kind: a sum treated as a mean would be 20x smaller here
    mean_ref = HessianOperator(model, nn.CrossEntropyLoss(), data=(X, y)).to_dense()
    assert rel_err(H_sum / 20, mean_ref) < 1e-12


def test_bad_losses_and_batches_are_clear_errors():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    X, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 2, (5,))
    v = torch.ones(8, dtype=DT)
    with pytest.raises(ValueError, match="scalar"):
        HessianOperator(model, loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), data=(X, y)) @ v
    bad = X.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(NonFiniteError):
        HessianOperator(model, loss_fn=lambda m, b: F.cross_entropy(m(b["x"]), b["y"]), data={"x": bad, "y": y}) @ v
    with pytest.raises(ValueError, match=r"(?s)\(inputs, targets\).*input key.*loss_fn="):
        HessianOperator(model, nn.CrossEntropyLoss(), data={"features": X, "y": y})
    with pytest.raises(ValueError, match="not both"):
        HessianOperator(model, nn.CrossEntropyLoss(), data=(X, y), loss_fn=lambda m, b: 0)
    with pytest.raises(ValueError, match="GGN needs the model's output"):
        GGNOperator(model, loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]), data=(X, y))
    with pytest.raises(ValueError, match="causal_lm_loss"):
        GGNOperator(TinyLM(), data=token_batches()[0])


def test_move_batch_is_recursive_and_leaves_other_leaves():
    Pair = collections.namedtuple("Pair", "a b")
    batch = {"x": [torch.ones(2, dtype=torch.float32), (torch.arange(3), "tag")], "p": Pair(torch.zeros(1), 7)}
    moved = move_batch(batch, "cpu", dtype=DT)
    assert moved["x"][0].dtype == DT and moved["x"][1][0].dtype == torch.int64 and moved["x"][1][1] == "tag"
    assert isinstance(moved["p"], Pair) and moved["p"].a.dtype == DT and moved["p"].b == 7
    assert isinstance(moved["x"][1], tuple)
    samples = split_samples({"ids": torch.arange(6).view(3, 2), "shared": torch.ones(5), "s": "x"})
    assert len(samples) == 3 and samples[1]["ids"].tolist() == [[2, 3]] and samples[1]["shared"].shape == (5,)


# -- GGN ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ggn_analytic_cross_entropy_equals_autograd_and_dense(reduction):
    model = mlp(3, 5, 4, seed=0)
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(9, 3, generator=g, dtype=DT), torch.randint(0, 4, (9,), generator=g)
    y[[2, 5]] = -100  # ignored positions
    ce = nn.CrossEntropyLoss(reduction=reduction)
    G_an = GGNOperator(model, ce, data=(X, y), analytic_cross_entropy=True).to_dense()
    G_ad = GGNOperator(model, ce, data=(X, y), analytic_cross_entropy=False).to_dense()
    ref = dense_ggn(model, lambda call: call(X), lambda o: ce(o, y))
    assert rel_err(G_an, G_ad) < 1e-12 and rel_err(G_an, ref) < 1e-10
    # batched products (is_grads_batched) take the same path
    V = torch.randn(G_an.shape[0], 3, generator=g, dtype=DT)
    op = GGNOperator(model, ce, data=(X, y), batched_matmat=True)
    assert rel_err(op @ V, G_an @ V) < 1e-12


def test_ggn_analytic_cross_entropy_with_spatial_classes_and_causal_lm():
    # classes along dim 1 of [N, C, T] (a criterion), and the causal-LM helper with padding
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv1d(3, 4, 1)).double()
    g = torch.Generator().manual_seed(4)
    X, y = torch.randn(3, 2, 5, generator=g, dtype=DT), torch.randint(0, 4, (3, 5), generator=g)
    y[0, 1] = -100
    ce = nn.CrossEntropyLoss()
    G_an = GGNOperator(conv, ce, data=(X, y), analytic_cross_entropy=True).to_dense()
    G_ad = GGNOperator(conv, ce, data=(X, y), analytic_cross_entropy=False).to_dense()
    assert rel_err(G_an, G_ad) < 1e-12
    assert rel_err(G_an, dense_ggn(conv, lambda call: call(X), lambda o: ce(o, y))) < 1e-10

    model = TinyLM()
    batches = token_batches()
    G_an = GGNOperator(model, loss_fn=causal_lm_loss, dataloader=batches, batch_weight=counted).to_dense()
    G_ad = GGNOperator(
        model, loss_fn=causal_lm_loss, dataloader=batches, batch_weight=counted, analytic_cross_entropy=False
    ).to_dense()
    assert rel_err(G_an, G_ad) < 1e-12
    # dense: the GGN of the mean over all counted tokens, J of the concatenated logits of all batches
    sizes = [b["input_ids"].numel() * 11 for b in batches]

    def outputs(call):
        return torch.cat([call(b["input_ids"]).logits.reshape(-1) for b in batches])

    def loss_of(flat_o):
        parts = torch.split(flat_o, sizes)
        logits_call = iter([p.view(*b["input_ids"].shape, 11) for p, b in zip(parts, batches)])
        return mean_over_counted_tokens(lambda ids: next(logits_call), batches)

    assert rel_err(G_an, dense_ggn(model, outputs, loss_of)) < 1e-10
    # split form: forward_fn + loss_of_output gives the same operator (autograd path)
    G_split = GGNOperator(
        model,
        dataloader=batches,
        batch_weight=counted,
        reduction="mean",
        forward_fn=lambda m, b: m(b["input_ids"]).logits,
        loss_of_output=lambda o, b: F.cross_entropy(
            o[:, :-1].reshape(-1, 11), b["labels"][:, 1:].reshape(-1), ignore_index=-100
        ),
    ).to_dense()
    assert rel_err(G_split, G_an) < 1e-12


# -- empirical Fisher -----------------------------------------------------------------------------


def test_empirical_fisher_equals_the_least_squares_closed_form():
    g = torch.Generator().manual_seed(5)
    X, y = torch.randn(13, 3, generator=g, dtype=DT), torch.randn(13, 1, generator=g, dtype=DT)
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    r = (model(X) - y).detach()[:, 0]  # residuals
    A = torch.cat([X, torch.ones(13, 1, dtype=DT)], dim=1)  # d(out)/d(weight, bias)
    per_sample = 2 * r[:, None] * A  # gradient of (out_i - y_i)^2
    closed = per_sample.T @ per_sample / 13
    mse = nn.MSELoss()
    for mode in ("vmap", "loop"):
        F1 = EmpiricalFisherOperator(model, mse, data=(X, y), per_sample=mode).to_dense()
        assert rel_err(F1, closed) < 1e-12, mode
        # a loader: (1/N) sum over all samples; the sum-reduction: sum without 1/N
        loader = [{"x": X[:5], "y": y[:5]}, {"x": X[5:], "y": y[5:]}]
        F2 = EmpiricalFisherOperator(model, mse, dataloader=loader, per_sample=mode).to_dense()
        assert rel_err(F2, closed) < 1e-12, mode
        F3 = EmpiricalFisherOperator(model, nn.MSELoss(reduction="sum"), dataloader=loader, per_sample=mode)
        assert rel_err(F3.to_dense(), closed * 13) < 1e-12, mode
    # it is not the Hessian (2 A^T A / n here): the test can tell them apart
    assert rel_err(HessianOperator(model, mse, data=(X, y)).to_dense(), closed) > 1e-2


def test_empirical_fisher_with_token_weights():
    model = TinyLM()
    batches = token_batches()
    ops = {
        mode: EmpiricalFisherOperator(
            model, loss_fn=causal_lm_loss, dataloader=batches, batch_weight=counted, per_sample=mode
        ).to_dense()
        for mode in ("vmap", "loop")
    }
    assert rel_err(ops["vmap"], ops["loop"]) < 1e-12
    # reference: (1/W) sum_i grad(s_i) grad(s_i)^T, s_i = (counted tokens of i) * (mean loss of i)
    names = [n for n, _ in model.named_parameters()]
    base = [p.detach() for p in model.parameters()]
    rows, W = [], 0
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            sample = {k: v[i : i + 1] for k, v in b.items()}
            w = int(counted(sample))
            W += w
            if w == 0:
                continue

            def s(flat, sample=sample, w=w):
                ps = dict(zip(names, unflatten(flat, base)))
                return w * mean_over_counted_tokens(lambda *a: torch.func.functional_call(model, ps, a), [sample])

            rows.append(torch.func.grad(s)(flatten(base)))
    R = torch.stack(rows)
    assert rel_err(ops["loop"], R.T @ R / W) < 1e-12


# -- parameter selection, tied weights ------------------------------------------------------------


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.h = nn.ModuleList(nn.ModuleDict({"attn": nn.Linear(3, 3), "mlp": nn.Linear(3, 3)}) for _ in range(2))
        self.head = nn.Linear(3, 2)
        self.double()

    def forward(self, x):
        for blk in self.h:
            x = torch.tanh(blk["mlp"](torch.tanh(blk["attn"](x))))
        return self.head(x)


def test_glob_and_regex_selection_is_the_matching_block_of_the_func_hessian_of():
    model = Blocks()
    g = torch.Generator().manual_seed(6)
    X, y = torch.randn(7, 3, generator=g, dtype=DT), torch.randint(0, 2, (7,), generator=g)
    ce = nn.CrossEntropyLoss()
    full = func_hessian_of(model, lambda call: ce(call(X), y))
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    for sel, want in (
        ("h.*.attn.*", ["h.0.attn.weight", "h.0.attn.bias", "h.1.attn.weight", "h.1.attn.bias"]),
        ("h.1.*", ["h.1.attn.weight", "h.1.attn.bias", "h.1.mlp.weight", "h.1.mlp.bias"]),
        ("re:h\\.[01]\\.mlp\\.weight", ["h.0.mlp.weight", "h.1.mlp.weight"]),
        (re.compile(r".*\.bias"), ["h.0.attn.bias", "h.0.mlp.bias", "h.1.attn.bias", "h.1.mlp.bias", "head.bias"]),
        ("h.?.attn", ["h.0.attn.weight", "h.0.attn.bias", "h.1.attn.weight", "h.1.attn.bias"]),  # modules
    ):
        H = HessianOperator(model, ce, data=(X, y), params=sel)
        assert H.param_names == want, sel
        idx = torch.cat([torch.arange(starts[names.index(n)], starts[names.index(n)] + sizes[names.index(n)])
                         for n in want])  # fmt: skip
        assert rel_err(H.to_dense(), full[idx][:, idx]) < 1e-10, sel
    with pytest.raises(ValueError, match=r"matches no parameter.*h\.0\.attn\.weight"):
        HessianOperator(model, ce, data=(X, y), params="blocks.*")
    with pytest.raises(ValueError, match="matches no parameter"):
        resolve_params(model, re.compile("nothing"))


def test_tied_weights_count_once():
    model = TinyLM(tied=True)
    b = token_batches()[0]
    assert model.lm_head.weight is model.wte.weight
    H = HessianOperator(model, data=b)
    assert H.param_names == ["wte.weight", "mix.weight", "mix.bias"] and H.size == 11 * 4 + 16 + 4
    ref = func_hessian_of(model, lambda call: mean_over_counted_tokens(call, [b]))  # functional_call keeps ties
    assert rel_err(H.to_dense(), ref) < 1e-10
    # the tied tensor selected by its second name is the same single block
    H_head = HessianOperator(model, data=b, params="lm_head.weight")
    assert H_head.param_names == ["wte.weight"] and rel_err(H_head.to_dense(), ref[:44, :44]) < 1e-10
    # untying changes the operator: the test would see a double count
    untied = TinyLM(tied=False)
    untied.lm_head.weight = nn.Parameter(model.wte.weight.detach().clone())
    untied.mix.load_state_dict(model.mix.state_dict())
    assert HessianOperator(untied, data=b).size == H.size + 44


# -- entry points ------------------------------------------------------------------------------------


def test_train_epoch_and_evaluate_take_dict_batches_and_loss_fn():
    g = torch.Generator().manual_seed(7)
    X, y = torch.randn(10, 3, generator=g, dtype=DT), torch.randint(0, 2, (10,), generator=g)
    loader = [{"x": X[:6], "y": y[:6], "id": "a"}, {"x": X[6:], "y": y[6:], "id": "b"}]

    def summed(m, b):
        return F.cross_entropy(m(b["x"]), b["y"], reduction="sum")

    def make():
        torch.manual_seed(0)
        return nn.Linear(3, 2).double()

    ref = make()
    F.cross_entropy(ref(X), y).backward()  # one step on the mean gradient over all 10 samples
    expected = [p.detach() - 0.5 * p.grad for p in ref.parameters()]
    for kw in ({"loss_fn": summed, "reduction": "sum"}, {"criterion": nn.CrossEntropyLoss()}):
        m = make()
        out = train_epoch(m, loader, torch.optim.SGD(m.parameters(), lr=0.5), large_ratio=2, **kw)
        assert out["samples"] == 10 and out["optimizer_steps"] == 1
        for p, e in zip(m.parameters(), expected):
            torch.testing.assert_close(p.detach(), e, rtol=1e-13, atol=1e-15)
    m = make()
    with pytest.raises(ValueError, match="train_epoch.*reduction"):
        train_epoch(m, loader, torch.optim.SGD(m.parameters(), lr=0.5), loss_fn=summed)
    with pytest.raises(ValueError, match="adv_ratio"):
        train_epoch(m, loader, torch.optim.SGD(m.parameters(), lr=0.5), loss_fn=summed, reduction="sum",
                    adv_ratio=0.5, eps=0.1)  # fmt: skip
    ev = evaluate(make(), loader, loss_fn=summed, reduction="sum")
    assert ev["samples"] == 10 and abs(ev["loss"] - float(F.cross_entropy(make()(X), y))) < 1e-13
    assert ev["accuracy"] is None
    with pytest.raises(ValueError, match="evaluate.*reduction"):
        evaluate(make(), loader, loss_fn=summed)


def test_per_layer_landscape_and_tracker_take_the_forms():
    model = Blocks()
    g = torch.Generator().manual_seed(8)
    X, y = torch.randn(8, 3, generator=g, dtype=DT), torch.randint(0, 2, (8,), generator=g)
    ce = nn.CrossEntropyLoss()
    batch = {"features": X, "y": y}

    def fn(m, b):
        return F.cross_entropy(m(b["features"]), b["y"])

    a = per_layer(model, ce, data=(X, y))
    b = per_layer(model, loss_fn=fn, data=batch)
    assert [r.name for r in a] == [r.name for r in b]
    for ra, rb in zip(a, b):
        assert abs(ra.trace - rb.trace) <= 1e-12 * abs(ra.trace) and rel_err(rb.eigenvalues, ra.eigenvalues) < 1e-10
    fisher = per_layer(model, ce, data=(X, y), operator="fisher")
    assert all(r.eigenvalues.min() > -1e-12 for r in fisher)  # PSD blocks
    n = sum(p.numel() for p in model.parameters())
    d = torch.randn(n, generator=g, dtype=DT)
    alphas = [-0.5, 0.0, 0.5]
    l1 = loss_landscape(model, ce, (X, y), d, alphas)
    l2 = loss_landscape(model, data=batch, directions=d, alphas=alphas, loss_fn=fn)
    torch.testing.assert_close(l1, l2, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="reduction"):
        loss_landscape(model, dataloader=[batch], directions=d, alphas=alphas, loss_fn=fn)
    r1 = top_eigenvalue(model, ce, data=(X, y), method="lanczos", tol=1e-10)
    r2 = top_eigenvalue(model, loss_fn=fn, data=batch, method="lanczos", tol=1e-10)
    assert abs(float(r1.eigenvalues[0]) - float(r2.eigenvalues[0])) < 1e-10 * abs(float(r1.eigenvalues[0]))
    tracker = hf.EigenTracker(loss_fn=fn, data=batch, method="lanczos", tol=1e-10)
    rec = tracker.step(model, 0)
    assert abs(rec["eigenvalue"] - float(r1.eigenvalues[0])) < 1e-10 * abs(rec["eigenvalue"])


# -- torchrun ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_ranks_sum_token_weighted_products_of_loss_fn_and_dict_batches(tmp_path):
    """Two gloo ranks, each with its own padded token batches: every operator equals the one-process
    operator over all batches (token weights summed over the ranks), and that equals the dense Hessian."""
    import os
    import socket
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    worker = os.path.join(root, "tests", "dist_loss_forms_worker.py")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update({"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "CUDA_VISIBLE_DEVICES": "",
                "PYTHONPATH": root + os.pathsep + env.get("PYTHONPATH", "")})  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), worker, str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"forms_rank{r}.pt", weights_only=True) for r in range(2))
    sys.path.insert(0, os.path.dirname(worker))
    from dist_loss_forms_worker import products

    one = products(0, 1)
    assert r0["num_samples"] == r1["num_samples"] == one["num_samples"] == 15  # tokens, summed over ranks
    for key in ("Hv", "Hv_loss", "Gv", "Fv", "grad"):
        assert torch.equal(r0[key], r1[key]), key  # the same on every rank
        assert rel_err(r0[key], one[key]) < 1e-12, key
    model, batches = TinyLM(), token_batches()
    ref = func_hessian_of(model, lambda call: mean_over_counted_tokens(call, batches))
    v = torch.randn(ref.shape[0], generator=torch.Generator().manual_seed(12), dtype=DT)
    assert rel_err(r0["Hv"], ref @ v) < 1e-10 and rel_err(r0["Hv_loss"], ref @ v) < 1e-10


@pytest.mark.slow
def test_analytic_cross_entropy_ggn_memory_at_vocab_32k():
    """benchmarks/bench_ggn_memory.py (peak RSS in child processes): the analytic GGN product stays
    within 3x the logits beyond a gradient's peak; the autograd path does not (so the test can fail)."""
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "benchmarks", "bench_ggn_memory.py")
    spec = importlib.util.spec_from_file_location("bench_ggn_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.main(bench.build_parser().parse_args([]))
    assert res["analytic"]["beyond_gradient_x_logits"] <= 3.0, res
    assert res["autograd"]["beyond_gradient_x_logits"] > 5.0, res
