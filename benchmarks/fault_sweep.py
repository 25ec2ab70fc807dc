"""A sweep of faults and mistakes against the scripts: kills, damaged checkpoints, bad flags.

Not a speed benchmark and not part of the test suite (the tests cover each case once); this runs many
of them and prints the counts quoted in the issue notes::

    python benchmarks/fault_sweep.py --kills 10 --flips 10 --seed 0

1. Kills: a tiny C1 run on synthetic data is SIGKILLed at random moments and resumed until it finishes;
   its final weights must equal an uninterrupted run's bit for bit (CPU), its checkpoint must load, and
   its epoch log must hold each epoch once, in strict JSON.
2. Damaged checkpoints: missing or mistyped fields, truncations and random byte flips, each through
   ``train.py --resume`` and ``hessian_eig_driver.py``: exit 0 (a flip that left the file usable) or 2
   with one line and no traceback.
3. Bad flags: exit 2, one line, no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = ["--name", "synthetic", "--synthetic-train", "128", "--synthetic-test", "64", "--arch", "c1", "--batch-size", "32",
     "--hessian-batch-size", "32", "--eig-max-iter", "3", "--no-progress", "--device", "cpu", "--large-ratio", "2",
     "--duration", "1"]  # fmt: skip
ENV = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")


def script(name, *argv, timeout=600):
    return subprocess.run([sys.executable, name, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def one_clean_line(proc) -> bool:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn" not in ln]
    return len(lines) == 1 and "Traceback" not in proc.stderr


def strict_epochs(path) -> list[int]:
    def refuse(name):
        raise ValueError(name)

    with open(path) as f:
        return [json.loads(line, parse_constant=refuse)["epoch"] for line in f]


def kills(work: str, count: int, epochs: int, rng: random.Random) -> dict:
    ref = os.path.join(work, "ref")
    assert script("train.py", *T, "--epochs", str(epochs), "--out-dir", ref, "--save", f"{ref}/c.pkl").returncode == 0
    run = os.path.join(work, "run")
    done, killed, starts = False, 0, 0
    while not done:
        argv = ["--resume", f"{run}/c.pkl"] if os.path.exists(f"{run}/c.pkl") else [
            *T, "--epochs", str(epochs), "--out-dir", run, "--save", f"{run}/c.pkl"]  # fmt: skip
        proc = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        starts += 1
        if killed < count:
            time.sleep(rng.uniform(1.0, 12.0))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                killed += 1
        _, err = proc.communicate(timeout=600)
        done = proc.returncode == 0
        if proc.returncode not in (0, -signal.SIGKILL):
            raise SystemExit(f"a resumed run failed ({proc.returncode}): {err[-500:]}")
    a = torch.load(f"{ref}/c.pkl", weights_only=True)["state_dict"]
    b = torch.load(f"{run}/c.pkl", weights_only=True)["state_dict"]
    identical = all(torch.equal(a[k], b[k]) for k in a)
    log_ok = strict_epochs(f"{run}/train_log.jsonl") == list(range(1, epochs + 1))
    return {"kills": killed, "starts": starts, "bit_identical": identical, "log_each_epoch_once": log_ok}


def damaged(work: str, good: str, flips: int, rng: random.Random) -> dict:
    from hessianflow.io.checkpoint import load_checkpoint, save_checkpoint

    base = load_checkpoint(good)
    cases = {}
    for field in ("optimizer", "rng", "absa", "epoch", "history", "args", "state_dict", "arch", "format"):
        c = dict(base)
        c.pop(field)
        cases[f"no {field}"] = c
    for field, value in (("epoch", "three"), ("arch", "vgg"), ("num_classes", -1), ("depth", "x"),
                         ("optimizer", {"state": 3}), ("rng", {"torch": 1}), ("history", [{"x": 1}]),
                         ("format", "other/9"), ("in_channels", 0)):  # fmt: skip
        cases[f"{field}={value!r}"] = {**base, field: value}
    paths = {}
    for name, c in cases.items():
        paths[name] = os.path.join(work, f"d{len(paths)}.pkl")
        save_checkpoint(c, paths[name])
    raw = open(good, "rb").read()
    for i in range(flips):
        p = os.path.join(work, f"flip{i}.pkl")
        data = bytearray(raw)
        for _ in range(8):
            data[rng.randrange(len(data))] = rng.randrange(256)
        open(p, "wb").write(bytes(data))
        paths[f"flip {i}"] = p
    for i, frac in enumerate((0.1, 0.5, 0.9)):
        p = os.path.join(work, f"trunc{i}.pkl")
        open(p, "wb").write(raw[: int(len(raw) * frac)])
        paths[f"truncated to {frac:.0%}"] = p
    outcome = {"files": len(paths), "runs": 0, "refused_one_line": 0, "usable": 0, "bad": []}
    for name, p in paths.items():
        for prog, argv in (("train.py", ["--resume", p, "--save", p + ".out", "--no-progress"]),
                           ("hessian_eig_driver.py", ["--resume", p, "--hessian-batch-size", "16", "--no-progress"])):
            proc = script(prog, *argv)
            outcome["runs"] += 1
            if proc.returncode == 0:
                outcome["usable"] += 1
            elif proc.returncode == 2 and one_clean_line(proc):
                outcome["refused_one_line"] += 1
            else:
                outcome["bad"].append((name, prog, proc.returncode, proc.stderr[-300:]))
    return outcome


BAD_FLAGS = [
    ("train.py", ["--lr", "-1"]), ("train.py", ["--lr", "nan"]), ("train.py", ["--epochs", "0"]),
    ("train.py", ["--batch-size", "x"]), ("train.py", ["--arch", "vgg"]), ("train.py", ["--depth", "21"]),
    ("train.py", ["--name", "imagenet"]), ("train.py", ["--lr-decay-epoch", "500"]), ("train.py", ["--eps", "2"]),
    ("train.py", ["--adv-ratio", "-0.1"]), ("train.py", ["--device", "cuda:7"]), ("train.py", ["--device", "tpu"]),
    ("train.py", ["--name", "cifar10", "--synthetic-train", "10"]), ("train.py", ["--method", "adam"]),
    ("train.py", ["--resume", "/nonexistent.pkl"]), ("train.py", ["--save", "/"]), ("train.py", ["--nosuchflag"]),
    ("train.py", ["--name", "cifar10", "--data-dir", "/nonexistent", "--epochs", "1"]),
    ("train_resnet.py", ["--arch", "c1"]), ("train_resnet.py", ["--depth", "7"]),
    ("hessian_eig_driver.py", []), ("hessian_eig_driver.py", ["--resume", "/nonexistent.pkl"]),
    ("hessian_eig_driver.py", ["--resume", "x.pkl", "--top-k", "0"]),
    ("hessian_eig_driver.py", ["--resume", "x.pkl", "--method", "power", "--which", "SA"]),
    ("hessian_eig_driver.py", ["--resume", "x.pkl", "--landscape", "3"]),
    ("hessian_eig_driver.py", ["--resume", "x.pkl", "--trace-matvecs", "2", "--trace"]),
    ("hessian_eig_driver.py", ["--resume", "x.pkl", "--num-batches", "2"]),
    ("hessian_eig_driver.py", ["--resume", "x.pkl", "--arch", "c1", "--depth", "20"]),
    ("hessian_eig_driver.py", ["--resume", "x.pkl", "--tol", "-1"]),
    ("hessian_eig_driver.py", ["--resume", "x.pkl", "--operator", "fisherman"]),
]


def bad_flags() -> dict:
    bad = []
    for prog, argv in BAD_FLAGS:
        proc = script(prog, *argv, timeout=120)
        if not (proc.returncode == 2 and one_clean_line(proc)):
            bad.append((prog, argv, proc.returncode, proc.stderr[-300:]))
    return {"tried": len(BAD_FLAGS), "one_line_exit_2": len(BAD_FLAGS) - len(bad), "bad": bad}


def main(args) -> dict:
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as work:
        result = {"kills": kills(work, args.kills, args.epochs, rng)}
        result["damaged"] = damaged(work, os.path.join(work, "ref", "c.pkl"), args.flips, rng)
        result["flags"] = bad_flags()
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=10, help="SIGKILLs at random moments (default: 10)")
    p.add_argument("--epochs", type=int, default=6, help="epochs of the killed run (default: 6)")
    p.add_argument("--flips", type=int, default=10, help="checkpoints with 8 random bytes changed (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="seeds the kill times and byte flips (default: 0)")
    main(p.parse_args())
