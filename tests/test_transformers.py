"""Curvature of transformers through the operators' loss forms, against dense float64 Hessians.

Four attention models, tiny and in float64, with random weights (no download):

- HuggingFace GPT-2 (causal LM, ``labels = input_ids``, the default ``sdpa`` attention, tied ``wte`` /
  ``lm_head``): the model output's ``.loss`` form, ``data={"input_ids": ..., "labels": ...}``;
- HuggingFace BERT for sequence classification, with a padding mask: the ``.loss`` form;
- a torchvision ``VisionTransformer`` (``nn.MultiheadAttention`` in eval mode): the criterion form;
- a nanoGPT-style model written here (``F.scaled_dot_product_attention``, pre-LayerNorm blocks, tied
  embedding): the ``loss_fn=`` form.

The references (tests/dense_reference.py) are a row-by-row double-backprop Hessian and central
differences of the gradient, built without hessianflow; the two agree to ~1e-11 here. The
``torch.func.hessian`` of these models is *not* used: it is wrong in torch 2.14.1 on LayerNorm
cross-derivatives (3e-2 relative on the nanoGPT model below; its ``jacrev`` differentiates a vmapped
``native_layer_norm_backward`` whose weight gradient loses its dependence on the input).
:func:`test_torch_func_hessian_is_not_a_reference_here` keeps the measurement and the minimal case.

The weights are redrawn larger than the models' initialisers (std 0.02 would make every attention
pattern nearly uniform and the Hessian nearly that of the output layer alone), and the LayerNorm
scales and shifts moved away from 1 and 0, so that the attention and normalisation blocks of the
Hessian are of the same order as the rest, and an error in any of them shows.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from dense_reference import hessian_central_differences, hessian_rows, need_transformers, rel_err
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import hessianflow as hf
from hessianflow.curvature.losses import causal_lm_loss

VOCAB, T, D = 16, 8, 6  # D = 6, two heads of 3: 300-900 parameters, dense references in seconds


def _spread(model: nn.Module, seed: int) -> nn.Module:
    """float64, eval mode, weights ~ N(0, 0.3^2), LayerNorm scales ~ 1 + N(0, 0.3^2)."""
    g = torch.Generator().manual_seed(seed)
    model.double().eval()
    with torch.no_grad():
        for m in model.modules():
            for name, p in m.named_parameters(recurse=False):
                noise = 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype)
                is_scale = isinstance(m, nn.LayerNorm) and name == "weight"
                p.copy_(1.0 + noise if is_scale else noise)
    return model


# -- the models ------------------------------------------------------------------------------


class _Block(nn.Module):
    """A pre-LayerNorm transformer block as in nanoGPT: causal self-attention, then a GELU MLP."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        B, L, C = x.shape  # noqa: N806
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, L, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, heads, L, C / heads]
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, L, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int = VOCAB, block_size: int = T, d: int = D, heads: int = 2, layers: int = 1):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block_size, d)
        self.h = nn.ModuleList([_Block(d, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _next_token_loss(call, batch):
    logits = call(batch["idx"])  # [B, T, V]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["idx"][:, 1:].flatten())


class Problem:
    """A model, a batch, the operator's keyword arguments, and the loss for the references."""

    def __init__(self, model, op_kwargs: dict, loss_of):
        self.model, self.op_kwargs, self.loss_of = model, op_kwargs, loss_of
        self.names = [n for n, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]

    def operator(self, **kwargs) -> hf.HessianOperator:
        return hf.HessianOperator(self.model, **self.op_kwargs, **kwargs)

    @functools.cached_property
    def rows(self) -> torch.Tensor:
        return hessian_rows(lambda: self.loss_of(self.model), self.params)

    @functools.cached_property
    def central(self) -> torch.Tensor:
        return hessian_central_differences(self.model, self.loss_of, self.names)

    @functools.cached_property
    def norm(self) -> torch.Tensor:
        return torch.linalg.matrix_norm(self.rows, ord=2)


def _ids(seed: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


def _gpt2_model():
    tr = need_transformers()
    cfg = tr.GPT2Config(
        vocab_size=VOCAB, n_positions=T, n_embd=D, n_layer=1, n_head=2, n_inner=2 * D,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = _spread(tr.GPT2LMHeadModel(cfg), seed=1)
    assert model.config._attn_implementation == "sdpa"  # HuggingFace's default: the case to cover
    assert model.lm_head.weight is model.transformer.wte.weight
    return model


def _gpt2() -> Problem:
    # loss_fn=causal_lm_loss, not the output's .loss: HuggingFace's ForCausalLMLoss casts the logits to
    # float32 (logits.float()), also float64 ones, so a float64 model's .loss is float32-accurate
    # (see test_gpt2_output_loss_form).
    model, ids = _gpt2_model(), _ids(1)

    def loss_of(m):  # the next-token mean cross-entropy, written out
        return F.cross_entropy(m(input_ids=ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    return Problem(model, {"loss_fn": causal_lm_loss, "data": {"input_ids": ids, "labels": ids}}, loss_of)


def _bert() -> Problem:
    tr = need_transformers()
    cfg = tr.BertConfig(
        vocab_size=VOCAB, hidden_size=D, num_hidden_layers=1, num_attention_heads=2, intermediate_size=2 * D,
        max_position_embeddings=T, type_vocab_size=1, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0,
    )  # fmt: skip
    model = _spread(tr.BertForSequenceClassification(cfg), seed=2)
    assert model.config._attn_implementation == "sdpa"
    ids = _ids(2, batch=4)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding: the additive mask path of SDPA
    mask[3, 3:] = 0
    labels = torch.tensor([0, 2, 1, 2])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return Problem(model, {"data": batch}, lambda m: m(**batch).loss)


def _vit() -> Problem:
    tv = pytest.importorskip("torchvision")
    model = tv.models.VisionTransformer(
        image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden_dim=D, mlp_dim=2 * D, num_classes=3
    )
    model = _spread(model, seed=3)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    return Problem(model, {"criterion": nn.CrossEntropyLoss(), "data": (x, y)}, lambda m: F.cross_entropy(m(x), y))


def _nanogpt() -> Problem:
    torch.manual_seed(4)
    model = _spread(NanoGPT(layers=2), seed=4)  # two blocks: cross-block curvature
    batch = {"idx": _ids(4)}
    return Problem(
        model,
        {"loss_fn": lambda m, b: _next_token_loss(m, b), "data": batch},
        lambda m: _next_token_loss(m, batch),
    )


_BUILDERS = {"gpt2": _gpt2, "bert": _bert, "vit": _vit, "nanogpt": _nanogpt}


@functools.cache
def _problem(name: str) -> Problem:
    return _BUILDERS[name]()


MODELS = list(_BUILDERS)


def _vectors(n: int, k: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# -- the references and the products ------------------------------------------------------------


def _is_attention(name: str) -> bool:
    return any(k in name for k in ("attn", "attention"))


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_the_two_dense_references_agree(name):
    p = _problem(name)
    assert 300 <= p.rows.shape[0] <= 2000
    # measured (max |rows - central| / ||H||_2, h = 1e-5): gpt2 2.3e-11, bert 1.4e-10, vit 1.1e-10,
    # nanogpt 4.1e-11; truncation O(h^2) and rounding O(eps / h) bound it near 1e-10
    assert rel_err(p.rows, p.central, p.norm) < 1e-8
    # the attention parameters' rows are not negligible (else the test would check the rest only)
    attn = torch.cat([torch.full((t.numel(),), _is_attention(n)) for n, t in zip(p.names, p.params)])
    assert torch.linalg.matrix_norm(p.rows[attn], ord=2) > 0.05 * p.norm


@pytest.mark.parametrize("backend", ["double_backprop", "forward_over_reverse"])
@pytest.mark.parametrize("name", MODELS)
def test_products_equal_the_dense_hessian(name, backend):
    p = _problem(name)
    H = p.operator(backend=backend)
    assert H.size == p.rows.shape[0]  # GPT-2's and nanoGPT's tied embeddings counted once
    V = _vectors(H.size)
    HV = torch.stack([H @ V[:, j] for j in range(V.shape[1])], dim=1)
    # measured: at most 4e-17 for both backends on every model
    assert rel_err(HV, p.rows @ V, p.norm * V.norm(dim=0).max()) < 1e-10


def test_gpt2_output_loss_form():
    """``data={"input_ids", "labels"}`` and no loss: the output's ``.loss``, HuggingFace's own causal LM loss.

    That loss casts the logits to float32 (``ForCausalLMLoss``: ``logits.float()``), float64 ones too,
    so its curvature equals the float64 one only to about float32 accuracy (measured 1.7e-9 relative).
    """
    p = _problem("gpt2")
    ids = p.op_kwargs["data"]["input_ids"]
    H = hf.HessianOperator(p.model, data={"input_ids": ids, "labels": ids})
    V = _vectors(H.size)
    HV = torch.stack([H @ V[:, j] for j in range(V.shape[1])], dim=1)
    assert rel_err(HV, p.rows @ V, p.norm * V.norm(dim=0).max()) < 1e-6


@pytest.mark.parametrize("backend", ["double_backprop", "forward_over_reverse"])
def test_batched_matmat_through_layer_norm_equals_dense(backend):
    # The batched products vmap *outside* the gradient (is_grads_batched over the second backward;
    # vmap of jvp(grad)); torch.func.hessian's wrong answer comes from a vmap *inside* it.
    p = _problem("nanogpt")
    H = p.operator(backend=backend, batched_matmat=True)
    V = _vectors(H.size, k=4, seed=1)
    assert rel_err(H.matmat(V), p.rows @ V, p.norm * V.norm(dim=0).max()) < 1e-10


@pytest.mark.parametrize("name", MODELS)
def test_lanczos_top3_equals_eigvalsh(name):
    p = _problem(name)
    res = hf.lanczos(p.operator(), k=3, tol=1e-10, seed=0)
    want = torch.linalg.eigvalsh(p.rows).flip(0)[:3]
    assert res.all_converged
    # measured: at most 1.5e-15 relative to the top eigenvalue (54-73 products)
    assert float((res.eigenvalues.to(want) - want).abs().max() / want[0].abs()) < 1e-8


def _layer_norm_case():
    """The smallest case found: ``d/dx`` of a LayerNorm's weight gradient, one 3 x 4 input."""
    g = torch.Generator().manual_seed(0)
    x, w, c, t = (torch.randn(s, generator=g, dtype=torch.float64) for s in [(3, 4), (4,), (3, 4), (3, 4)])

    def grad_w(x_):  # dL/dw of L = sum(c * layer_norm(x; w)^2)
        return torch.func.grad(lambda w_: (F.layer_norm(x_, (4,), w_) ** 2 * c).sum())(w)

    fd = (grad_w(x + 1e-6 * t) - grad_w(x - 1e-6 * t)) / 2e-6  # [4]: the exact value to ~1e-9
    return x, t, grad_w, fd


def test_forward_over_reverse_is_exact_through_layer_norm_cross_derivatives():
    # jvp(grad), without a vmap inside the gradient: what the forward-over-reverse backend computes
    x, t, grad_w, fd = _layer_norm_case()
    _, jvp = torch.func.jvp(grad_w, (x,), (t,))
    assert float((jvp - fd).abs().max()) < 1e-7 * float(fd.abs().max())  # measured 5e-10


@pytest.mark.skipif(not torch.__version__.startswith("2.14."), reason="measured on torch 2.14.1")
def test_torch_func_hessian_is_not_a_reference_here():
    """Keeps the measurement behind the choice of references (pytorch#196700 in the issue).

    ``torch.func.hessian`` is ``jacfwd(jacrev(f))``, and ``jacrev`` computes the gradient under a
    vmap: differentiating a vmapped ``native_layer_norm_backward`` loses the weight gradient's
    dependence on the input. Minimal case: the same ``jvp`` of a LayerNorm's weight gradient, with
    the gradient taken inside a one-element vmap, is off by 3.0 where the answer is at most 3.9.
    """
    x, t, grad_w, fd = _layer_norm_case()
    _, jvp_vmapped = torch.func.jvp(lambda x_: torch.func.vmap(grad_w)(x_[None])[0], (x,), (t,))
    assert float((jvp_vmapped - fd).abs().max()) > 0.1 * float(fd.abs().max())  # measured 0.77

    p = _problem("nanogpt")
    base = {n: t.detach() for n, t in p.model.named_parameters()}

    def loss(ps):
        return p.loss_of(lambda *a, **kw: torch.func.functional_call(p.model, ps, a, kw))

    with sdpa_kernel(SDPBackend.MATH):
        blocks = torch.func.hessian(loss)(base)
    sizes = {n: t.numel() for n, t in base.items()}
    dense = torch.cat([torch.cat([blocks[a][b].reshape(sizes[a], sizes[b]) for b in p.names], 1) for a in p.names])
    # measured 3e-2 of ||H||_2, in the rows of LayerNorm scales against the parameters before them
    assert rel_err(dense, p.rows, p.norm) > 1e-3
