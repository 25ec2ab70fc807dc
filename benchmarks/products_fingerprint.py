"""Save a checkpoint's curvature products, to compare two checkouts bit for bit.

    python benchmarks/products_fingerprint.py CHECKOUT CHECKPOINT OUT.pt

Loads ``CHECKPOINT`` with the ``hessianflow`` of ``CHECKOUT`` (a git worktree of any commit), draws one
synthetic CIFAR-shaped batch of 64 and one vector from a fixed seed, and saves ``[H v, H v again, H [v, 2v],
G v, H v over a loader of two batches]``. Two checkouts' files are compared with ``torch.equal``
(benchmarks/README.md, "Issue 19").
"""

import sys
import warnings

import torch

checkout, checkpoint, out = sys.argv[1:4]
sys.path.insert(0, checkout)
import hessianflow as hf  # noqa: E402

try:
    from hessianflow.io.checkpoint_format import load_model
except ImportError:  # before the io/ subpackage
    from hessianflow.checkpoint_format import load_model

warnings.simplefilter("ignore")
model = load_model(checkpoint)
model = model[0] if isinstance(model, tuple) else model
g = torch.Generator().manual_seed(0)
x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
crit = torch.nn.CrossEntropyLoss()
H = hf.HessianOperator(model, crit, data=(x, y))
v = torch.randn(H.size, generator=g)
loader = [(x[:40], y[:40]), (x[40:], y[40:])]
products = [H @ v, H @ v, H.matmat(torch.stack([v, 2 * v], 1)), hf.GGNOperator(model, crit, data=(x, y)) @ v]
products.append(hf.HessianOperator(model, crit, dataloader=loader) @ v)
torch.save(products, out)
print(f"saved {len(products)} products of {H.size} parameters to {out}")
