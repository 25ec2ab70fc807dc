"""``micro_batch_size=``: a batch run in chunks is the same operator, held one chunk at a time.

References are dense float64 Hessians of the whole batch's (or loader's) loss built with
``torch.func.hessian`` on models without LayerNorm (where it is a valid reference), independently of
hessianflow's products; the chunked operators are compared with them, not with the unchunked operator
alone.
"""

import pytest
import torch
import torch.nn.functional as F
from dense_reference import func_hessian_of as dense_hessian
from test_loss_forms import TinyLM, counted, mean_over_counted_tokens, rel_err, token_batches
from torch import nn

import hessianflow as hf
from hessianflow.curvature.batches import split_batch

DT = torch.float64


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def batch(n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def whole_batch_hessian(model, x, y, reduction="mean"):
    return dense_hessian(model, lambda call: F.cross_entropy(call(x), y, reduction=reduction))


@pytest.mark.parametrize("size", [1, 3, 4, 10, 64])
def test_chunked_hessian_equals_the_whole_batch_hessian(size):
    model = mlp()
    x, y = batch()
    ref = whole_batch_hessian(model, x, y)
    op = hf.HessianOperator(model, nn.CrossEntropyLoss(), data=(x, y), micro_batch_size=size)
    assert rel_err(op.to_dense(), ref) < 1e-12
    assert op.num_samples == 10
    # a chunk smaller than the batch: nothing held between products; one chunk: the graph is reused
    assert op.reuse_graph == (size >= 10)
    v = torch.randn(op.size, dtype=DT, generator=torch.Generator().manual_seed(2))
    g = hf.curvature.hvp.flatten(torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters())))
    assert rel_err(op.gradient(), g) < 1e-12
    assert rel_err(op.matvec(v), ref @ v) < 1e-12


def test_chunked_sum_loss_and_loader_equal_the_dense_references():
    model = mlp(3)
    x, y = batch(9, seed=4)
    ref_sum = whole_batch_hessian(model, x, y, reduction="sum")
    op = hf.HessianOperator(model, nn.CrossEntropyLoss(reduction="sum"), data=(x, y), micro_batch_size=2)
    assert rel_err(op.to_dense(), ref_sum) < 1e-12
    # a loader of unequal batches, each split: the mean over all 9 samples
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    op = hf.HessianOperator(model, nn.CrossEntropyLoss(), dataloader=loader, micro_batch_size=3)
    assert rel_err(op.to_dense(), whole_batch_hessian(model, x, y)) < 1e-12
    assert op.num_samples == 9


def test_chunked_padded_token_batches_are_the_mean_over_counted_tokens():
    model = TinyLM()
    batches = token_batches()
    ref = dense_hessian(model, lambda call: mean_over_counted_tokens(call, batches))
    op = hf.HessianOperator(
        model, loss_fn=hf.causal_lm_loss, dataloader=batches, batch_weight=counted, micro_batch_size=1
    )
    assert rel_err(op.to_dense(), ref) < 1e-12
    # one padded batch, chunked: still the mean over its counted tokens
    one = batches[1]
    op = hf.HessianOperator(model, loss_fn=hf.causal_lm_loss, data=one, batch_weight=counted, micro_batch_size=2)
    ref_one = dense_hessian(model, lambda call: mean_over_counted_tokens(call, [one]))
    assert rel_err(op.to_dense(), ref_one) < 1e-12
    # causal_lm_loss declares its units: the same matrix without batch_weight (issue 19)
    plain = hf.HessianOperator(model, loss_fn=hf.causal_lm_loss, data=one, micro_batch_size=1)
    assert rel_err(plain.to_dense(), ref_one) < 1e-12
    # chunks weighted by sequences (1/3 each instead of 3/6, 1/6, 2/6 of the counted tokens) would be a
    # different matrix: the test can tell
    by_rows = lambda b: b["input_ids"].shape[0]  # noqa: E731
    wrong = hf.HessianOperator(model, loss_fn=hf.causal_lm_loss, data=one, micro_batch_size=1, batch_weight=by_rows)
    assert rel_err(wrong.to_dense(), ref_one) > 1e-3


def test_chunked_ggn_and_empirical_fisher_equal_their_whole_batch_operators():
    model = mlp(5)
    x, y = batch(8, seed=6)
    for cls in (hf.GGNOperator, hf.EmpiricalFisherOperator):
        whole = cls(model, nn.CrossEntropyLoss(), data=(x, y)).to_dense()
        chunked = cls(model, nn.CrossEntropyLoss(), data=(x, y), micro_batch_size=3).to_dense()
        assert rel_err(chunked, whole) < 1e-12, cls.__name__
        assert whole.abs().max() > 1e-3  # not a comparison of zeros


def test_chunked_matmat_and_forward_over_reverse():
    model = mlp(7)
    x, y = batch(7, seed=8)
    ref = whole_batch_hessian(model, x, y)
    V = torch.randn(ref.shape[0], 3, dtype=DT, generator=torch.Generator().manual_seed(9))
    for backend in ("double_backprop", "forward_over_reverse"):
        op = hf.HessianOperator(model, nn.CrossEntropyLoss(), data=(x, y), micro_batch_size=2, backend=backend)
        assert rel_err(op.matmat(V), ref @ V) < 1e-12, backend


def test_split_batch_shares_leaves_without_the_sample_dimension():
    b = {"x": torch.arange(10.0).view(5, 2), "mask": torch.ones(3), "scale": torch.tensor(2.0), "tag": "t"}
    chunks = split_batch(b, 2)
    assert [c["x"][:, 0].tolist() for c in chunks] == [[0.0, 2.0], [4.0, 6.0], [8.0]]
    assert all(c["mask"] is b["mask"] and c["scale"] is b["scale"] and c["tag"] == "t" for c in chunks)
    assert split_batch(b, 5)[0] is b


def test_micro_batch_errors_are_clear():
    model = mlp()
    x, y = batch()
    with pytest.raises(ValueError, match="micro_batch_size must be an integer >= 1"):
        hf.HessianOperator(model, nn.CrossEntropyLoss(), data=(x, y), micro_batch_size=0)
    with pytest.raises(ValueError, match="micro_batch_size must be an integer"):
        hf.HessianOperator(model, nn.CrossEntropyLoss(), data=(x, y), micro_batch_size=2.5)
    # a plain loss function: how the chunks combine cannot be guessed
    with pytest.raises(ValueError, match=r"to combine micro-batches \(micro_batch_size=\) the loss's reduction"):
        hf.HessianOperator(model, loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]), data=(x, y), micro_batch_size=2)
    op = hf.HessianOperator(
        model, loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]), data=(x, y), micro_batch_size=2, reduction="mean"
    )
    assert rel_err(op.to_dense(), whole_batch_hessian(model, x, y)) < 1e-12
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    with pytest.raises(ValueError, match="BatchNorm"):
        hf.HessianOperator(bn, nn.CrossEntropyLoss(), data=(x, y), micro_batch_size=2, train_mode=True)
    # eval mode: BatchNorm is a fixed affine map, chunks are exact
    bn.eval()
    ref = dense_hessian(bn, lambda call: F.cross_entropy(call(x), y))
    op = hf.HessianOperator(bn, nn.CrossEntropyLoss(), data=(x, y), micro_batch_size=4)
    assert rel_err(op.to_dense(), ref) < 1e-12
