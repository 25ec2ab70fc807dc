"""The objective, declared once: every way of splitting the data gives the whole batch's matrix.

The loss of a batch averages over *units* (samples, counted targets, class-weighted targets, counted
tokens) or sums them; the operators weight every piece of a split (a loader's batches, micro-batches,
ranks, the empirical Fisher's samples) by the units it holds, derived from the loss itself where the
library can know them. Each case here gave a silently wrong matrix (or an error) before the objective
declared its units (issue 19); the references are the unsplit batch's operator and dense float64
matrices built without hessianflow.
"""

from __future__ import annotations

import collections
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

try:
    from dense_reference import func_hessian_of, hessian_rows, mlp, need_transformers
except ImportError:  # pragma: no cover - pytest's importlib mode
    from tests.dense_reference import func_hessian_of, hessian_rows, mlp, need_transformers

from hessianflow import EmpiricalFisherOperator, GGNOperator, HessianOperator
from hessianflow.curvature.losses import causal_lm_loss, seq2seq_loss

DT = torch.float64
KINDS = {"hessian": HessianOperator, "ggn": GGNOperator, "fisher": EmpiricalFisherOperator}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def classification_batch(n=8, d=3, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g)


# -- a tiny HuggingFace GPT-2 in float64, one row padded --------------------------------------------
def tiny_gpt2(seed=0):
    tr = need_transformers()
    torch.manual_seed(seed)
    cfg = tr.GPT2Config(vocab_size=13, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    return tr.GPT2LMHeadModel(cfg).double().eval()


def padded_lm_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 13, (4, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0  # one padded row, as a tokenizer pads
    labels = ids.masked_fill(mask == 0, -100)
    labels[3, 1:5] = -100  # and a row with most labels left out
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lm_head_params(model):
    return ["lm_head.weight"] if hasattr(model, "lm_head") else None


# -- 1. micro-batches of a token-mean loss ------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_micro_batches_of_causal_lm_loss_give_the_whole_batch(chunk):
    model, batch = tiny_gpt2(), padded_lm_batch()
    params = ["transformer.h.0.mlp.c_proj.weight"]
    whole = HessianOperator(model, loss_fn=causal_lm_loss, data=batch, params=params).to_dense()
    split = HessianOperator(model, loss_fn=causal_lm_loss, data=batch, params=params, micro_batch_size=chunk)
    assert rel(split.to_dense(), whole) < 1e-12
    # the units are the counted shifted labels, summed over the chunks
    assert split.num_samples == int((batch["labels"][:, 1:] != -100).sum())


@pytest.mark.parametrize("chunk", [1, 2])
def test_micro_batches_of_a_huggingface_loss_give_the_whole_batch(chunk):
    model, batch = tiny_gpt2(), padded_lm_batch()
    params = ["transformer.h.0.mlp.c_proj.weight"]
    whole = HessianOperator(model, data=batch, params=params).to_dense()
    split = HessianOperator(model, data=batch, params=params, micro_batch_size=chunk).to_dense()
    # HuggingFace computes its .loss from logits.float(): the documented float32 caveat
    assert rel(split, whole) < 1e-5
    # and the float64 helper is the same matrix to that accuracy
    ref = HessianOperator(model, loss_fn=causal_lm_loss, data=batch, params=params).to_dense()
    assert rel(whole, ref) < 1e-5


def test_micro_batches_of_bert_masked_lm_loss_give_the_whole_batch():
    tr = need_transformers()
    torch.manual_seed(0)
    cfg = tr.BertConfig(
        vocab_size=11, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
        max_position_embeddings=8,
    )  # fmt: skip
    model = tr.BertForMaskedLM(cfg).double().eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 11, (4, 5), generator=g)
    labels = torch.full_like(ids, -100)
    labels[0, 1], labels[1, 0], labels[1, 3], labels[1, 4], labels[3, 2] = 3, 4, 5, 6, 7  # row 2: none counted
    batch = {"input_ids": ids, "labels": labels}
    params = ["cls.predictions.transform.dense.weight"]
    whole = HessianOperator(model, data=batch, params=params).to_dense()
    split = HessianOperator(model, data=batch, params=params, micro_batch_size=1)
    assert rel(split.to_dense(), whole) < 1e-5
    assert split.num_samples == 5  # the counted labels, unshifted


def test_seq2seq_loss_over_a_loader_weights_counted_labels():
    # a stand-in encoder-decoder: logits from the input ids; seq2seq_loss's units are its counted labels
    torch.manual_seed(0)
    emb = nn.Embedding(7, 7).double()

    class S2S(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = emb

        def forward(self, input_ids, labels=None):
            return {"logits": torch.tanh(self.emb(input_ids)) * 3}

    model = S2S()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6], [2, 2, 1]])
    labels = torch.tensor([[2, -100, -100], [1, 3, 5], [-100, 0, 6]])
    batch = {"input_ids": ids, "labels": labels}
    whole = HessianOperator(model, loss_fn=seq2seq_loss, data=batch).to_dense()
    loader = [{"input_ids": ids[:1], "labels": labels[:1]}, {"input_ids": ids[1:], "labels": labels[1:]}]
    assert rel(HessianOperator(model, loss_fn=seq2seq_loss, dataloader=loader).to_dense(), whole) < 1e-12
    assert rel(HessianOperator(model, loss_fn=seq2seq_loss, data=batch, micro_batch_size=1).to_dense(), whole) < 1e-12


# -- 2. cross-entropy with ignore_index or class weights -------------------------------------------
CRITERIA = {
    "ignore_index": lambda: nn.CrossEntropyLoss(ignore_index=2),
    "weight": lambda: nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=DT)),
    "both+smoothing": lambda: nn.CrossEntropyLoss(
        weight=torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=DT), ignore_index=1, label_smoothing=0.1
    ),
}


@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher"])
@pytest.mark.parametrize("name", ["ignore_index", "weight", "both+smoothing"])
@pytest.mark.parametrize("split", ["micro1", "micro3", "loader"])
def test_cross_entropy_splits_give_the_whole_batch(kind, name, split):
    model = mlp(3, 5, 4, seed=1)
    crit = CRITERIA[name]()
    x, y = classification_batch()
    y[:3] = torch.tensor([2, 2, 1])  # ignored targets in the first chunks (a chunk of only ignored ones)
    op = KINDS[kind]
    whole = op(model, crit, data=(x, y)).to_dense()
    if split == "loader":
        split_op = op(model, crit, dataloader=[(x[:3], y[:3]), (x[3:], y[3:])])
    else:
        split_op = op(model, crit, data=(x, y), micro_batch_size=int(split[-1]))
    assert rel(split_op.to_dense(), whole) < 1e-12


def test_cross_entropy_units_are_the_counted_class_weights():
    model = mlp(3, 5, 4, seed=1)
    w = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=DT)
    x, y = classification_batch()
    y[0] = -100
    H = HessianOperator(model, nn.CrossEntropyLoss(weight=w), dataloader=[(x[:4], y[:4]), (x[4:], y[4:])])
    H.gradient()
    assert H.num_samples == pytest.approx(float(w[y[1:]].sum()), rel=1e-15)
    # and the matrix is the Hessian of torch's own weighted mean, by double-backprop rows
    ps = list(model.parameters())
    ref = hessian_rows(lambda: F.cross_entropy(model(x), y, weight=w), ps)
    assert rel(H.to_dense(), ref) < 1e-12


def test_a_chunk_of_only_ignored_targets_contributes_zero():
    model = mlp(3, 5, 4, seed=1)
    x, y = classification_batch()
    y[:2] = -100
    whole = HessianOperator(model, nn.CrossEntropyLoss(), data=(x, y)).to_dense()
    for kind in KINDS.values():  # no NonFiniteError from the all-ignored chunk
        split = kind(model, nn.CrossEntropyLoss(), data=(x, y), micro_batch_size=2).to_dense()
        assert torch.isfinite(split).all()
    split = HessianOperator(model, nn.CrossEntropyLoss(), data=(x, y), micro_batch_size=2).to_dense()
    assert rel(split, whole) < 1e-12


# -- 3. the empirical Fisher with ignored targets ---------------------------------------------------
def fisher_reference(model, x, y, weight=None, ignore_index=-100):
    """(1/W) sum_i g_i g_i^T, g_i the gradient of sample i's share w_i l_i of the summed loss."""
    ps = list(model.parameters())
    rows, total = [], 0.0
    for i in range(x.shape[0]):
        if int(y[i]) == ignore_index:
            continue
        w_i = 1.0 if weight is None else float(weight[y[i]])
        loss = w_i * F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, ps)]))
        total += w_i
    G = torch.stack(rows)
    return G.T @ G / total


@pytest.mark.parametrize("per_sample", ["vmap", "loop"])
def test_empirical_fisher_leaves_ignored_samples_out(per_sample):
    model = mlp(3, 5, 4, seed=2)
    x, y = classification_batch(seed=4)
    y[[1, 5]] = -100
    F_op = EmpiricalFisherOperator(model, nn.CrossEntropyLoss(), data=(x, y), per_sample=per_sample)
    assert rel(F_op.to_dense(), fisher_reference(model, x, y)) < 1e-12


@pytest.mark.parametrize("per_sample", ["vmap", "loop"])
def test_empirical_fisher_with_class_weights(per_sample):
    model = mlp(3, 5, 4, seed=2)
    w = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=DT)
    x, y = classification_batch(seed=5)
    F_op = EmpiricalFisherOperator(model, nn.CrossEntropyLoss(weight=w), data=(x, y), per_sample=per_sample)
    assert rel(F_op.to_dense(), fisher_reference(model, x, y, weight=w)) < 1e-12


# -- 4. and 5. mapping inputs: a UserDict, a dict --------------------------------------------------
class DictNet(nn.Module):
    """A model whose input is a mapping ``{"a": [n, 2], "b": [n, 1]}``."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.f = nn.Linear(3, 2).double()

    def forward(self, inputs):
        return torch.tanh(self.f(torch.cat([inputs["a"], inputs["b"]], dim=1)))


def dict_batch(kind=dict, n=5):
    g = torch.Generator().manual_seed(7)
    inputs = kind({"a": torch.randn(n, 2, generator=g, dtype=DT), "b": torch.randn(n, 1, generator=g, dtype=DT)})
    return inputs, torch.randn(n, 2, generator=g, dtype=DT)


def mse_fisher_reference(model, inputs, y):
    ps = list(model.parameters())
    n, rows = y.shape[0], []
    for i in range(n):
        sample = {k: v[i : i + 1] for k, v in inputs.items()}
        loss = F.mse_loss(model(sample), y[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, ps)]))
    G = torch.stack(rows)
    return G.T @ G / n


@pytest.mark.parametrize("per_sample", ["vmap", "loop"])
@pytest.mark.parametrize("container", [dict, collections.UserDict])
def test_empirical_fisher_splits_mapping_inputs(per_sample, container):
    model = DictNet()
    inputs, y = dict_batch(container)
    F_op = EmpiricalFisherOperator(model, nn.MSELoss(), data=(inputs, y), per_sample=per_sample)
    assert rel(F_op.to_dense(), mse_fisher_reference(model, dict(inputs), y)) < 1e-12


@pytest.mark.parametrize("fast_paths", [True, False])
@pytest.mark.parametrize("container", [dict, collections.UserDict])
def test_criterion_batches_with_mapping_inputs(container, fast_paths):
    model = DictNet()
    inputs, y = dict_batch(container)
    ref = func_hessian_of(model, lambda call: F.mse_loss(call(dict(inputs)), y))
    H = HessianOperator(model, nn.MSELoss(), data=(inputs, y), fast_paths=fast_paths)
    assert rel(H.to_dense(), ref) < 1e-12
    split = HessianOperator(model, nn.MSELoss(), data=(inputs, y), micro_batch_size=2, fast_paths=fast_paths)
    assert rel(split.to_dense(), ref) < 1e-12
    G = GGNOperator(model, nn.MSELoss(), data=(inputs, y), fast_paths=fast_paths).to_dense()
    assert torch.isfinite(G).all() and G.shape == ref.shape


# -- 6. an attended padding embedding row ------------------------------------------------------------
class PadNet(nn.Module):
    """Token ids -> embedding (padding row 0, attended: nothing masks it) -> a smooth head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(5, 3, padding_idx=0).double()
        with torch.no_grad():
            self.emb.weight[0] = torch.tensor([0.3, -0.2, 0.5])  # a non-zero padding row, used by the forward
        self.head = nn.Linear(3, 4).double()

    def forward(self, ids):
        h = torch.tanh(self.emb(ids)).mean(1)  # [B, 3]
        return self.head(h * h.sum(1, keepdim=True))  # mixes every position, the padding ones too


@pytest.mark.parametrize("backend", ["double_backprop", "forward_over_reverse", "finite_difference"])
def test_padding_row_is_held_constant_in_every_backend(backend):
    model = PadNet()
    ids = torch.tensor([[1, 0, 2], [3, 4, 0], [0, 0, 1]])
    y = torch.tensor([0, 3, 1])
    H = HessianOperator(model, nn.CrossEntropyLoss(), data=(ids, y), backend=backend).to_dense()
    ref = HessianOperator(model, nn.CrossEntropyLoss(), data=(ids, y)).to_dense()
    pad = torch.zeros(H.shape[0], dtype=torch.bool)
    pad[:3] = True  # emb.weight[0] comes first in the flat vector
    assert H[pad].abs().max() == 0 and H[:, pad].abs().max() == 0
    tol = 1e-7 if backend == "finite_difference" else 1e-12
    assert float((H - H.T).abs().max()) < tol * float(ref.abs().max())
    assert rel(H, ref) < tol
    # and the rest is the true Hessian with the padding row held constant
    names = ["emb.weight", "head.weight", "head.bias"]
    full = func_hessian_of(model, lambda call: F.cross_entropy(call(ids), y), names)
    keep = ~pad
    assert rel(H[keep][:, keep], full[keep][:, keep]) < tol


def test_padding_row_of_a_ggn_and_fisher_is_zero():
    model = PadNet()
    ids = torch.tensor([[1, 0, 2], [3, 4, 0], [0, 0, 1]])
    y = torch.tensor([0, 3, 1])
    for kind in (GGNOperator, EmpiricalFisherOperator):
        M = kind(model, nn.CrossEntropyLoss(), data=(ids, y)).to_dense()
        assert M[:3].abs().max() == 0 and M[:, :3].abs().max() == 0


# -- a model's own .loss outside HuggingFace: its units are not known, so a split needs a declaration -
def test_a_custom_models_loss_split_needs_a_declaration():
    class OwnLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(2, 1).double()

        def forward(self, x, y):
            return types.SimpleNamespace(loss=F.mse_loss(self.f(x), y))

    model = OwnLoss()
    x, y = torch.randn(4, 2, dtype=DT), torch.randn(4, 1, dtype=DT)
    HessianOperator(model, data=(x, y)).to_dense()  # one batch: nothing to weight
    with pytest.raises(ValueError, match="reduction"):
        HessianOperator(model, data=(x, y), micro_batch_size=2)
    whole = HessianOperator(model, data=(x, y)).to_dense()
    split = HessianOperator(model, data=(x, y), micro_batch_size=3, reduction="mean").to_dense()
    assert rel(split, whole) < 1e-12


# -- the training loop weights its accumulated mini-batches by the same units --------------------------
def test_train_epoch_accumulates_the_mean_over_counted_targets():
    from hessianflow.training.loop import train_epoch

    model = mlp(3, 5, 4, seed=3)
    x, y = classification_batch(n=10, seed=8)
    y[[0, 1, 2, 7]] = -100  # the first mini-batch holds one counted target, the second three
    ps = [p.detach().clone() for p in model.parameters()]
    expected = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    train_epoch(model, loader, opt, nn.CrossEntropyLoss(), large_ratio=2)
    for before, p, g in zip(ps, model.parameters(), expected):
        torch.testing.assert_close(before - p.detach(), g, rtol=1e-12, atol=1e-15)


# -- issue 21: what the operators say about bad input and random data -------------------------------
def test_a_loader_that_sees_other_samples_every_pass_is_not_deterministic():
    from torch.utils.data import DataLoader, TensorDataset

    model = mlp(3, 5, 4, seed=1)
    x, y = classification_batch(n=10)
    ds = TensorDataset(x, y)
    crit = nn.CrossEntropyLoss()
    assert HessianOperator(model, crit, dataloader=DataLoader(ds, batch_size=4)).deterministic
    assert HessianOperator(model, crit, dataloader=DataLoader(ds, batch_size=4, shuffle=True)).deterministic
    assert HessianOperator(
        model, crit, dataloader=DataLoader(ds, batch_size=5, shuffle=True, drop_last=True)
    ).deterministic
    with pytest.warns(RuntimeWarning, match="drops its last partial batch"):
        H = HessianOperator(model, crit, dataloader=DataLoader(ds, batch_size=4, shuffle=True, drop_last=True))
    assert not H.deterministic
    with pytest.warns(RuntimeWarning, match="first 1 batches"):
        H = HessianOperator(model, crit, dataloader=DataLoader(ds, batch_size=4, shuffle=True), num_batches=1)
    assert not H.deterministic
    from torch.utils.data import RandomSampler

    with pytest.warns(RuntimeWarning, match="replacement"):
        sampler = RandomSampler(ds, replacement=True)
        H = HessianOperator(model, crit, dataloader=DataLoader(ds, batch_size=4, sampler=sampler))
    assert not H.deterministic


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (3, "takes parameters, modules, names"),
        ("re:[", "not a valid regular expression"),
        ("", "empty name"),
        (["0.weight", 2.5], "got float"),
    ],
)
def test_bad_params_get_one_sentence(params, message):
    model = mlp(3, 5, 4, seed=1)
    with pytest.raises(ValueError, match=message):
        HessianOperator(model, nn.CrossEntropyLoss(), data=classification_batch(), params=params)


def test_a_set_of_names_selects_in_model_order():
    model = mlp(3, 5, 4, seed=1)
    names = {"2.bias", "0.weight", "2.weight"}
    H = HessianOperator(model, nn.CrossEntropyLoss(), data=classification_batch(), params=names)
    assert H.param_names == ["0.weight", "2.weight", "2.bias"]


def test_a_loss_fn_that_ignores_the_parameters_gets_one_sentence():
    model = mlp(3, 5, 4, seed=1)
    x, y = classification_batch()
    fn = lambda m, b: F.cross_entropy(m(b[0]).detach(), b[1])  # noqa: E731
    for op in (HessianOperator, GGNOperator):
        kw = {"loss_fn": fn} if op is HessianOperator else {"forward_fn": lambda m, b: m(b[0]).detach(),
              "loss_of_output": lambda o, b: F.cross_entropy(o, b[1])}  # fmt: skip
        with pytest.raises(ValueError, match="does not depend on the chosen parameters"):
            op(model, data=(x, y), **kw).to_dense()


def test_loss_landscape_raises_on_a_non_finite_loss():
    from hessianflow import NonFiniteError, loss_landscape

    model = mlp(3, 5, 4, seed=1)
    x, y = classification_batch()
    x[0, 0] = float("nan")
    n = sum(p.numel() for p in model.parameters())
    with pytest.raises(NonFiniteError):
        loss_landscape(model, nn.CrossEntropyLoss(), (x, y), torch.ones(n, dtype=DT), [0.0, 0.1])


def test_unknown_keywords_are_a_type_error_naming_the_valid_ones():
    model = mlp(3, 5, 4, seed=1)
    with pytest.raises(TypeError, match="micro_batch_size"):
        HessianOperator(model, nn.CrossEntropyLoss(), data=classification_batch(), micro_batch=2)


def test_operator_signatures_are_real():
    import inspect

    for op in KINDS.values():
        sig = inspect.signature(op.__init__)
        names = [p.name for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        assert {"model", "criterion", "data", "dataloader", "params", "loss_fn", "objective"} <= set(names)
        assert len(names) - 1 <= 12  # self excluded
        assert all(
            p.kind is p.KEYWORD_ONLY
            for p in sig.parameters.values()
            if p.name not in ("self", "model", "criterion", "options")
        )


# -- forward-over-reverse through torch 2.14's mse_loss bug -----------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_forward_over_reverse_takes_mse_loss(reduction):
    model = mlp(3, 5, 2, seed=4)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, 2, generator=g, dtype=DT)
    crit = nn.MSELoss(reduction=reduction)
    ref = hessian_rows(lambda: crit(model(x), y), list(model.parameters()))
    H = HessianOperator(model, crit, data=(x, y), backend="forward_over_reverse")
    assert rel(H.to_dense(), ref) < 1e-12
    V = torch.randn(H.size, 3, generator=g, dtype=DT)
    assert rel(H.matmat(V), ref @ V) < 1e-12  # the vmapped path too


def test_torch_still_fails_forward_over_reverse_of_mean_mse_loss():
    """The reduced torch case behind products._DecomposedMSE: when this test fails, torch has fixed the
    bug and the workaround can go."""
    x, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)
    w = torch.randn(2, 3, dtype=DT)
    with pytest.raises(RuntimeError, match="ZeroTensors are immutable"):
        torch.func.jvp(torch.func.grad(lambda w: F.mse_loss(x @ w.T, y)), (w,), (torch.ones_like(w),))


def test_a_partly_sharded_model_is_refused_in_one_sentence(tmp_path):
    """Issue 20: DTensor parameters mixed with plain ones (a module sharded by hand, not by fully_shard) are
    refused in one sentence; before sharded products existed they gave silent zeros."""
    import datetime

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))  # fmt: skip
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = mlp(3, 5, 4, seed=1)
        model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.detach(), mesh, [Shard(0)]))
        for op in KINDS.values():
            with pytest.raises(ValueError, match="mix FSDP2-sharded DTensors and plain tensors .e.g. '0.bias'"):
                op(model, nn.CrossEntropyLoss(), data=classification_batch())
    finally:
        dist.destroy_process_group()


# -- issue 21: the pieces of a vector stay aligned with their parameters when one is unused ---------
class UnusedFirst(nn.Module):
    """Three layers of one shape; the first is never used, so its gradient is None (zeros)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.unused, self.a, self.b = (nn.Linear(3, 3, bias=False).double() for _ in range(3))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize(
    ("kind", "backend"),
    [("hessian", "double_backprop"), ("hessian", "forward_over_reverse"), ("ggn", None), ("fisher", None)],
)
def test_an_unused_first_layer_keeps_the_pieces_aligned(kind, backend):
    model = UnusedFirst()
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(10, 3, generator=g, dtype=DT), torch.randn(10, 3, generator=g, dtype=DT)
    kw = {"backend": backend} if kind == "hessian" else {}
    M = KINDS[kind](model, nn.MSELoss(), data=(x, y), **kw).to_dense()
    used = ["a.weight", "b.weight"]
    if kind == "hessian":
        ref_used = func_hessian_of(model, lambda call: F.mse_loss(call(x), y), used)
    else:
        full = KINDS[kind](model, nn.MSELoss(), data=(x, y), params=used).to_dense()
        ref_used = full
    assert M[:9].abs().max() == 0 and M[:, :9].abs().max() == 0  # the unused layer's rows and columns
    assert rel(M[9:, 9:], ref_used) < 1e-12
    top = hf_lanczos_top(M)
    assert abs(top - float(torch.linalg.eigvalsh(ref_used)[-1])) < 1e-9 * abs(top)


def hf_lanczos_top(M):
    from hessianflow import lanczos

    return float(lanczos(M, k=1, tol=1e-10, seed=0).eigenvalues[0])
