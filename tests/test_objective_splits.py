"""Property: no way of splitting the data changes an operator (issue 19).

Random splits (a loader of unequal batches, empty ones included; micro-batches of 1..B samples; 1-3 gloo
ranks each holding an unequal share, possibly none) of batches with random ignored-target and class-weight
patterns give, in float64, the whole batch's Hessian, GGN and empirical Fisher to 1e-12, for criteria,
a plain loss function with declared units, the loss helpers, and a HuggingFace model's own ``.loss``
(computed by HuggingFace in float32: its own tolerance). The whole-batch operators themselves are checked
against dense float64 references in tests/test_objective.py and tests/test_loss_forms.py.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

try:
    import objective_cases as oc
    from dense_reference import need_transformers
    from test_distributed import torchrun
except ImportError:  # pragma: no cover - pytest's importlib mode
    from tests import objective_cases as oc
    from tests.dense_reference import need_transformers
    from tests.test_distributed import torchrun

from hessianflow import EmpiricalFisherOperator, GGNOperator, HessianOperator

KINDS = {"H": HessianOperator, "G": GGNOperator, "F": EmpiricalFisherOperator}
HERE = os.path.dirname(os.path.abspath(__file__))


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def dense_or_error(op, model, **kw):
    try:
        return op(model, **kw).to_dense()
    except ValueError as e:  # e.g. every target of the batch ignored: no units to average over
        return e


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=st.sampled_from(sorted(oc.cases())),
    n=st.integers(2, 7),
    parts=st.integers(1, 4),
    micro=st.one_of(st.none(), st.integers(1, 7)),
    ignore=st.sampled_from([0.0, 0.3, 0.7]),
    seed=st.integers(0, 2**16),
)
def test_every_split_gives_the_whole_batch(case, n, parts, micro, ignore, seed):
    make_model, make_kw, make_batch, kinds = oc.cases()[case]
    g = torch.Generator().manual_seed(seed)
    model, batch = make_model(seed % 5), make_batch(g, n, ignore)
    loader = oc.pieces(batch, oc.random_split(g, n, parts))
    for kind in kinds:
        op = KINDS[kind]
        whole = dense_or_error(op, model, **make_kw(), data=batch)
        split = dense_or_error(op, model, **make_kw(), dataloader=loader, micro_batch_size=micro)
        if isinstance(whole, Exception):
            assert isinstance(split, Exception) and "no units" in str(split), (kind, whole, split)
            continue
        assert rel(split, whole) < 1e-12, (
            case,
            kind,
            [len(p[1] if isinstance(p, tuple) else p["labels"]) for p in loader],
        )


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(micro=st.integers(1, 4), parts=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_every_split_of_a_huggingface_loss_gives_the_whole_batch(micro, parts, seed):
    tr = need_transformers()
    torch.manual_seed(0)
    cfg = tr.GPT2Config(vocab_size=7, n_positions=8, n_embd=4, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    model = tr.GPT2LMHeadModel(cfg).double().eval()
    g = torch.Generator().manual_seed(seed)
    batch = oc.tokens(g, 4, 0.3)
    batch["labels"][0, 1:] = 0  # at least one counted label
    params = ["lm_head.weight"]
    whole = HessianOperator(model, data=batch, params=params).to_dense()
    loader = oc.pieces(batch, oc.random_split(g, 4, parts))
    split = HessianOperator(model, dataloader=loader, micro_batch_size=micro, params=params).to_dense()
    # HuggingFace computes its .loss from logits.float(): the documented float32 caveat
    assert rel(split, whole) < 1e-5
    # ... against the float64 helper, whose splits agree to 1e-12
    helper = HessianOperator(model, loss_fn=oc.causal_lm_loss, data=batch, params=params).to_dense()
    assert rel(whole, helper) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_give_the_whole_batch(world, tmp_path):
    """Each rank holds an unequal share (some none) in a loader of unequal batches, in micro-batches."""
    proc, _ = torchrun(tmp_path, nproc=world, timeout=400, script=os.path.join(HERE, "dist_objective_worker.py"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sys.path.insert(0, HERE)
    import dist_objective_worker as worker

    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for name, whole in worker.references().items():
        for r in range(world):
            got = results[r][name]
            assert rel(got, whole) < 1e-12, (name, r, json.dumps(results[r]["_splits"].get(name)))
