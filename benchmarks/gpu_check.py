"""One-shot GPU check: the library and the three scripts on CUDA, against the CPU, plus GPU timings.

Usage (on a machine with a CUDA GPU; from the repository root; no install needed)::

    PYTHONPATH=. python benchmarks/gpu_check.py --out gpu_check_out       # ~3-5 min on one H100/H200
    PYTHONPATH=. python benchmarks/gpu_check.py --skip-pytest --skip-scripts  # numerics and timings only

Every step runs even when an earlier one fails; each prints ``PASS``/``FAIL`` with its numbers, and the
whole report (and every step's log) is written to ``--out``. Exit status 1 if any step failed.

Steps:

* ``numerics``: float64 small CNN with BatchNorm (eval) and an MLP: the CUDA Hessian product equals
  the CPU one (rtol 1e-10), batched ``matmat`` equals a loop, GGN, ``exact_hessian``; Lanczos,
  power iteration, Hutchinson, Hutch++, SLQ and FGSM give the CPU's numbers for the same seed (the
  random vectors are drawn on the CPU, so only rounding differs).
* ``timings``: ResNet-20, batch 64 (float32, eval): one gradient, one reused-graph HVP and a batched
  ``matmat`` of 10 per vector, as multiples of the gradient; CUDA-synchronised medians.
* ``scripts``: ``train.py`` (ABSA, C1, synthetic data) on CUDA, with ``--amp``, resumed; ``train_resnet.py``
  with eigenvalue tracking; ``hessian_eig_driver.py`` on the CUDA checkpoint on CUDA and on the CPU
  (same eigenvalues); ``torchrun --nproc_per_node 1`` (NCCL) for ``train.py`` and the driver.
* ``pytest``: the (CPU) test suite on this machine's torch, with pytest-xdist if present.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEV = "cuda"  # --dry-run-cpu: "cpu", to exercise this script on a machine without a GPU
REPORT: list[str] = []
FAILED: list[str] = []


def say(line: str = "") -> None:
    print(line, flush=True)
    REPORT.append(line)


def check(name: str, ok: bool, detail: str) -> None:
    say(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    if not ok:
        FAILED.append(name)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float(torch.linalg.vector_norm(a - b) / max(float(torch.linalg.vector_norm(b)), 1e-300))


# ------------------------------------------------------------------------------------------------
# numerics: CUDA against CPU
# ------------------------------------------------------------------------------------------------
def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    ).double()
    m.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            m(torch.randn(16, 3, 8, 8, dtype=torch.float64))
    return m.eval()


def step_numerics() -> None:
    import copy

    import hessianflow as hf
    from hessianflow.training.adversarial import fgsm

    crit = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (24,), generator=g)
    cpu_model = small_cnn()
    gpu_model = copy.deepcopy(cpu_model).to(DEV)
    Hc = hf.HessianOperator(cpu_model, crit, data=(x, y))
    Hg = hf.HessianOperator(gpu_model, crit, data=(x.to(DEV), y.to(DEV)))
    check("operator device/dtype", Hg.device.type == DEV and Hg.dtype == torch.float64, f"{Hg.device}, {Hg.dtype}")
    V = torch.randn(Hc.size, 6, generator=g, dtype=torch.float64)
    hv_c = Hc.matvec(V[:, 0])
    hv_g = Hg.matvec(V[:, 0].to(DEV))
    check("HVP cuda == cpu (float64 CNN+BN)", rel(hv_g, hv_c) < 1e-10, f"rel diff {rel(hv_g, hv_c):.2e}")
    HV_g = Hg.matmat(V.to(DEV))  # batched by default on CUDA
    HV_loop = torch.stack([Hg.matvec(V[:, i].to(DEV)) for i in range(6)], dim=1)
    check("matmat (batched) == loop on cuda", rel(HV_g, HV_loop) < 1e-10, f"rel diff {rel(HV_g, HV_loop):.2e}")
    Hf = hf.HessianOperator(gpu_model, crit, data=(x.to(DEV), y.to(DEV)), backend="forward_over_reverse")
    hv_f = Hf.matvec(V[:, 0].to(DEV))
    check("forward-over-reverse == double backprop (cuda)", rel(hv_f, hv_c) < 1e-10, f"rel diff {rel(hv_f, hv_c):.2e}")
    Gc = hf.GGNOperator(cpu_model, crit, data=(x, y))
    Gg = hf.GGNOperator(gpu_model, crit, data=(x.to(DEV), y.to(DEV)))
    d = rel(Gg.matvec(V[:, 1].to(DEV)), Gc.matvec(V[:, 1]))
    check("GGN cuda == cpu", d < 1e-10, f"rel diff {d:.2e}")
    loader = [(x[i : i + 7].to(DEV), y[i : i + 7].to(DEV)) for i in range(0, 24, 7)]  # 7, 7, 7, 3
    Hl = hf.HessianOperator(gpu_model, crit, dataloader=loader)
    d = rel(Hl.matvec(V[:, 2].to(DEV)), Hc.matvec(V[:, 2]))
    check("data loader (unequal batches) cuda == one batch cpu", d < 1e-10, f"rel diff {d:.2e}")

    mlp = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    xm = torch.randn(30, 5, generator=g, dtype=torch.float64)
    ym = torch.randint(0, 3, (30,), generator=g)
    Dc = hf.exact_hessian(mlp, crit, data=(xm, ym))
    Dg = hf.exact_hessian(copy.deepcopy(mlp).to(DEV), crit, data=(xm.to(DEV), ym.to(DEV)))
    check("exact_hessian cuda == cpu", rel(Dg, Dc) < 1e-10, f"rel diff {rel(Dg, Dc):.2e}")
    ref = torch.linalg.eigvalsh(Dc).flip(0)

    Mg = hf.HessianOperator(copy.deepcopy(mlp).to(DEV), crit, data=(xm.to(DEV), ym.to(DEV)))
    lz = hf.lanczos(Mg, k=3, tol=1e-10, seed=0)
    d = rel(lz.eigenvalues, ref[:3])
    check(
        "lanczos top-3 on cuda == eigvalsh",
        d < 1e-8 and bool(lz.converged.all()),
        f"rel err {d:.2e}, {lz.num_matvecs} products",
    )
    lzc = hf.lanczos(hf.HessianOperator(mlp, crit, data=(xm, ym)), k=3, tol=1e-10, seed=0)
    check(
        "lanczos cuda == cpu, same seed",
        rel(lz.eigenvalues, lzc.eigenvalues) < 1e-10 and lz.num_matvecs == lzc.num_matvecs,
        f"rel diff {rel(lz.eigenvalues, lzc.eigenvalues):.2e}, products {lz.num_matvecs} vs {lzc.num_matvecs}",
    )
    pw = hf.power_iteration(Mg, k=1, max_iter=500, tol=1e-10, seed=0)
    d = abs(float(pw.eigenvalues[0]) - float(ref[0])) / abs(float(ref[0]))
    check("power iteration top-1 on cuda", d < 1e-6, f"rel err {d:.2e}")
    exact = float(Dc.diagonal().sum())
    for name, fn in (("hutchinson", hf.linalg.trace.hutchinson_trace), ("hutch++", hf.linalg.trace.hutchpp_trace)):
        tg, tc = fn(Mg, num_matvecs=60, seed=3), fn(Dc, num_matvecs=60, seed=3)
        same = abs(tg.estimate - tc.estimate) <= 1e-9 * abs(tc.estimate)
        within = abs(tg.estimate - exact) <= 3 * tg.stderr + 1e-12
        check(
            f"{name} cuda == cpu (seed 3), exact within 3 SE",
            same and within,
            f"{tg.estimate:.6f} vs {tc.estimate:.6f}, exact {exact:.6f} +- {tg.stderr:.2g}",
        )
    dg, dc = (
        hf.spectral_density(Mg, num_runs=2, num_steps=20, seed=4),
        hf.spectral_density(Dc, num_runs=2, num_steps=20, seed=4),
    )
    d = max(rel(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(dg.nodes, dc.nodes))
    check("SLQ nodes cuda == cpu", d < 1e-8, f"rel diff {d:.2e}")

    # float32 products: TF32 off by default in the operator (PyTorch turns it on for cuDNN convolutions)
    from hessianflow.training.models import get_model

    torch.manual_seed(0)
    c1 = get_model("c1").eval()
    xc, yc = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    vc = torch.randn(sum(p.numel() for p in c1.parameters()), generator=g)
    ref64 = hf.HessianOperator(copy.deepcopy(c1).double(), crit, data=(xc, yc)).matvec(vc.double())
    c1g = copy.deepcopy(c1).to(DEV)
    for tf32 in (False, True):
        hv = hf.HessianOperator(c1g, crit, data=(xc.to(DEV), yc.to(DEV)), allow_tf32=tf32).matvec(vc.to(DEV))
        d = rel(hv, ref64)
        bound = 1e-4 if not tf32 else float("inf")
        check(f"float32 C1 HVP on {DEV} vs float64, allow_tf32={tf32}", d < bound, f"rel err {d:.2e}")
    hv_cpu = hf.HessianOperator(c1, crit, data=(xc, yc)).matvec(vc)
    check("float32 C1 HVP on cpu vs float64", True, f"rel err {rel(hv_cpu, ref64):.2e}")

    xa, ya = x[:8].float(), y[:8]
    fm = copy.deepcopy(cpu_model).float()
    adv_c = fgsm(fm, xa, ya, eps=0.03, criterion=crit)
    adv_g = fgsm(copy.deepcopy(fm).to(DEV), xa.to(DEV), ya.to(DEV), eps=0.03, criterion=crit)
    d = float((adv_g.cpu() - adv_c).abs().max())
    check("fgsm cuda == cpu (float32)", d < 1e-5 and adv_g.device.type == DEV, f"max abs diff {d:.2e}")

    import warnings

    from hessianflow.compat import get_eigen

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        val, vec = get_eigen(
            copy.deepcopy(mlp).to(DEV), xm.to(DEV), ym.to(DEV), crit, cuda=DEV == "cuda", maxIter=500, tol=1e-10
        )
    d = abs(val - float(ref[0])) / abs(float(ref[0]))
    check("compat get_eigen(cuda=True)", d < 1e-6, f"rel err {d:.2e}")


# ------------------------------------------------------------------------------------------------
# timings
# ------------------------------------------------------------------------------------------------
def device_name() -> str:
    return torch.cuda.get_device_name() if DEV == "cuda" else "cpu"


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def cuda_time(fn, repeats: int = 10) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_timings() -> None:
    import hessianflow as hf
    from hessianflow.training.models import get_model

    torch.manual_seed(0)
    model = get_model("ResNet", depth=20).to(DEV).eval()
    crit = nn.CrossEntropyLoss()
    x = torch.randn(64, 3, 32, 32, device=DEV)
    y = torch.randint(0, 10, (64,), device=DEV)
    params = [p for p in model.parameters()]

    def grad():
        torch.autograd.grad(crit(model(x), y), params)

    H = hf.HessianOperator(model, crit, data=(x, y))
    v = torch.randn(H.size, device=DEV)
    V = torch.randn(H.size, 10, device=DEV)
    tg = cuda_time(grad)
    th = cuda_time(lambda: H.matvec(v))
    tb = cuda_time(lambda: H.matmat(V), repeats=5) / 10
    H2 = hf.HessianOperator(model, crit, data=(x, y), batched_matmat=False)
    tl = cuda_time(lambda: H2.matmat(V), repeats=5) / 10
    say(
        f"timing ResNet-20 batch 64 on {device_name()}: gradient {tg * 1e3:.2f} ms; HVP reused "
        f"{th * 1e3:.2f} ms ({th / tg:.2f}x); matmat of 10 batched {tb * 1e3:.2f} ms/vector ({tb / tg:.2f}x), "
        f"loop {tl * 1e3:.2f} ms/vector ({tl / tg:.2f}x)"
    )

    for v0 in (None, "gradient"):
        sync()
        t0 = time.perf_counter()
        r = hf.lanczos(hf.HessianOperator(model, crit, data=(x, y)), k=1, tol=1e-2, seed=0, v0=v0)
        sync()
        say(
            f"timing ResNet-20 lanczos top-1 (tol 1e-2, v0={v0}): {r.num_matvecs} products, "
            f"{time.perf_counter() - t0:.3f} s, lambda_1 = {float(r.eigenvalues[0]):.4f}"
        )
    check("timings ran", True, "see the lines above")


# ------------------------------------------------------------------------------------------------
# the scripts
# ------------------------------------------------------------------------------------------------
def sh(name: str, cmd: list[str], out: str, timeout: int = 240, env_extra: dict | None = None) -> bool:
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1", **(env_extra or {}))
    t0 = time.perf_counter()
    logname = os.path.join(out, re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") + ".log")
    with open(logname, "w") as log:
        try:
            rc = subprocess.run(
                cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=env
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    secs = time.perf_counter() - t0
    with open(logname) as f:
        tail = f.read().strip().splitlines()[-3:]
    check(name, rc == 0, f"exit {rc}, {secs:.1f} s; " + " | ".join(tail)[-400:])
    return rc == 0


def step_scripts(out: str) -> None:
    py = sys.executable
    work = os.path.join(tempfile.gettempdir(), "hessianflow_gpu_check")  # checkpoints stay out of --out
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)

    def w(name: str) -> str:
        return os.path.join(work, name)

    def train(script: str, flags: str, save: str, out_dir: str) -> list[str]:
        tail = ["--device", DEV, "--no-progress", "--save", w(save), "--out-dir", w(out_dir)]
        return [script, *data, *flags.split(), *tail]

    data = "--name synthetic --synthetic-train 2000 --synthetic-test 400".split()
    c1 = "--arch c1 --batch-size 64 --large-ratio 4 --duration 1 --lr 0.02 --lr-decay-epoch 2"
    ck, ck2 = w("c1.pkl"), w("c1_resume.pkl")
    if sh("train.py ABSA c1 cuda 3 epochs", [py, *train("train.py", c1 + " --epochs 3", "c1.pkl", "c1")], out):
        with open(w("c1/metrics.json")) as f:
            m = json.load(f)
        check(
            "train.py metrics",
            m["epochs"] == 3 and m["final_test_acc"] > 0.15 and m["final_batch_size"] > 64,
            f"epochs {m['epochs']}, test acc {m['final_test_acc']:.3f}, final batch {m['final_batch_size']}, "
            f"{m['wall_time']:.1f} s",
        )
    first_two = [py, *train("train.py", c1 + " --epochs 2", "c1_resume.pkl", "c1r")]
    if sh("train.py cuda 2 epochs (to resume)", first_two, out):
        resumed = [py, *train("train.py", c1 + " --epochs 3", "c1_resume.pkl", "c1r"), "--resume", ck2]
        sh("train.py cuda --resume to 3 epochs", resumed, out)
        if os.path.exists(ck) and os.path.exists(ck2):
            a = torch.load(ck, map_location="cpu", weights_only=True)
            b = torch.load(ck2, map_location="cpu", weights_only=True)
            # On CUDA two runs of one seed already differ (cuDNN and atomic-add kernels are not bit
            # reproducible: measured on an H200, epoch-2 test accuracy 0.455 vs 0.485), so the resume is
            # checked by its schedule: the same epoch, number of updates and batch size.
            key = ("epoch", "updates")
            same = [a[k] for k in key] + [a["absa"]["large_ratio"]] == [b[k] for k in key] + [b["absa"]["large_ratio"]]
            check(
                "resumed cuda run: same schedule as uninterrupted",
                same,
                f"epoch/updates {a['epoch']}/{a['updates']} vs {b['epoch']}/{b['updates']}",
            )
    if DEV == "cuda":
        sh("train.py --amp (bf16) cuda", [py, *train("train.py", c1 + " --epochs 2 --amp", "amp.pkl", "amp")], out)
    flags = "--epochs 2 --lr 0.1 --lr-decay 0.2 --lr-decay-epoch 1 --batch-size 64"
    resnet = [py, *train("train_resnet.py", flags, "resnet.pkl", "resnet")]
    sh("train_resnet.py cuda, eigenvalue per epoch", resnet, out)
    if os.path.exists(ck):
        drv = [py, "hessian_eig_driver.py", "--resume", ck, "--no-progress"]
        drv += "--hessian-batch-size 128 --top-k 3 --trace --trace-matvecs 20 --density --density-runs 1".split()
        drv += "--density-steps 30".split()
        jg, jc = w("drv_cuda.json"), w("drv_cpu.json")
        ok_g = sh("driver on cuda", [*drv, "--device", DEV, "--json", jg, "--out-dir", w("dg")], out)
        ok_c = sh("driver on cpu", [*drv, "--device", "cpu", "--json", jc, "--out-dir", w("dc")], out)
        if ok_g and ok_c:
            eg = json.load(open(jg))["eigen"]["eigenvalues"]
            ec = json.load(open(jc))["eigen"]["eigenvalues"]
            d = max(abs(a - b) / abs(b) for a, b in zip(eg, ec))
            check("driver eigenvalues cuda == cpu (float32 products)", d < 1e-3, f"{eg} vs {ec}: max rel {d:.1e}")
    trun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    sh("torchrun nproc 1 (NCCL) train.py", [*trun, *train("train.py", c1 + " --epochs 2", "ddp.pkl", "ddp")], out)
    if os.path.exists(ck):
        drv = [*trun, "hessian_eig_driver.py", "--resume", ck, "--hessian-batch-size", "128", "--top-k", "2"]
        drv += ["--device", DEV, "--no-progress", "--json", w("ddp_drv.json"), "--out-dir", w("ddpd")]
        sh("torchrun nproc 1 (NCCL) driver", drv, out)


def step_pytest(out: str) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider"]
    try:
        import xdist  # noqa: F401

        cmd += ["-n", "12"]
    except ImportError:
        pass
    sh("pytest (CPU suite without slow tests, on this machine's torch)", cmd, out, timeout=170)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check_out", help="directory for the report and logs")
    p.add_argument("--skip-scripts", action="store_true")
    p.add_argument("--skip-pytest", action="store_true")
    p.add_argument("--skip-timings", action="store_true")
    p.add_argument("--dry-run-cpu", action="store_true", help="run every step on the CPU (tests this script)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    global DEV
    if args.dry_run_cpu:
        DEV = "cpu"
    elif not torch.cuda.is_available():
        print("no CUDA GPU: nothing to check", file=sys.stderr)
        return 2
    say(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {device_name()}, python {sys.version.split()[0]}")
    steps = [("numerics", step_numerics)]
    if not args.skip_timings:
        steps.append(("timings", step_timings))
    if not args.skip_scripts:
        steps.append(("scripts", lambda: step_scripts(args.out)))
    if not args.skip_pytest:
        steps.append(("pytest", lambda: step_pytest(args.out)))
    for name, fn in steps:
        t0 = time.perf_counter()
        say(f"== {name}")
        try:
            fn()
        except Exception:
            check(f"{name} (crashed)", False, traceback.format_exc()[-1500:])
        say(f"   {name}: {time.perf_counter() - t0:.1f} s")
    say(f"== {len(FAILED)} failed: {FAILED}" if FAILED else "== all passed")
    with open(os.path.join(args.out, "report.txt"), "w") as f:
        f.write("\n".join(REPORT) + "\n")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
