"""Train the reference zonal model from scratch on simulated cases (CPU, 2 threads).

    python -m scanside.training.zones.train --cases 240 --minutes 10 --out var/zones-run

1. Cases: ``scanside.training.zones.data.build_cache`` renders seeds 0..N-1 once (npz, var/zones-cache/).
2. Slice stacks (a slice and its two neighbours, zero beyond the volume), two thirds of them
   through the gland; random left-right flips, intensity scale/offset jitter; loss = cross-entropy
   + soft Dice over TZ and PZ. Runs for a wall-clock budget with a cosine learning-rate schedule.

Writes <out>/model.pt (state dict + config) and <out>/train.json (timings, losses).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np

from scanside.agent.service.progress import progress

from scanside.training.common import merge_stages


def _stacks(x: np.ndarray, y: np.ndarray, n: int, rng: np.random.Generator, k: int = 1):
    """n random (2k+1)-slice stacks (n, 2k+1, H, W) and their centre-slice labels (n, H, W)."""
    N, _, D, H, W = x.shape
    xs, ys = [], []
    for _ in range(n):
        i = int(rng.integers(N))
        zs = np.flatnonzero(y[i].reshape(D, -1).any(1))
        z = int(rng.choice(zs)) if len(zs) and rng.random() < 2 / 3 else int(rng.integers(D))
        st = np.zeros((2 * k + 1, H, W), dtype=np.float32)
        for j in range(-k, k + 1):
            if 0 <= z + j < D:
                st[j + k] = x[i, 0, z + j]
        lab = y[i, z].astype(np.int64)
        if rng.random() < 0.5:
            st, lab = st[..., ::-1], lab[..., ::-1]
        st = st * rng.uniform(0.85, 1.15) + rng.normal(0, 0.15)
        xs.append(np.ascontiguousarray(st))
        ys.append(np.ascontiguousarray(lab))
    return np.stack(xs).astype(np.float32), np.stack(ys)


def train(cases: int = 240, minutes: float = 10.0, out: str = "var/zones-run", batch: int = 12, lr: float = 3e-3,
          seed: int = 0, threads: int = 2, cache_dir: Optional[str] = None, max_steps: Optional[int] = None,
          widths=(12, 24, 48), init: Optional[str] = None, log=print) -> dict:
    import torch

    from scanside.training.zones.data import DEFAULT_CACHE, build_cache, load_cache
    from scanside.training.zones.model import ZoneNet, n_parameters

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    paths = build_cache(range(cases), cache_dir or DEFAULT_CACHE, workers=threads)
    t_data = time.perf_counter() - t0
    x, y = load_cache(paths)
    log(f"{len(paths)} cases, data {t_data:.0f} s")

    model = ZoneNet(widths=tuple(widths))
    if init:  # continue from a checkpoint (its widths win)
        model = load_model(init)
        model.train()
        widths = model.widths
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    budget = minutes * 60.0
    t1 = time.perf_counter()
    step, hist = 0, []
    model.train()
    # steps where a step budget is given, else the wall-clock budget's seconds
    bar = progress(total=max_steps or int(budget), desc="training", unit="step" if max_steps else "s")
    while True:
        frac = (time.perf_counter() - t1) / budget
        if frac >= 1.0 or (max_steps is not None and step >= max_steps):
            break
        for g in opt.param_groups:
            g["lr"] = lr * (0.02 + 0.98 * 0.5 * (1 + np.cos(np.pi * min(frac, 1.0))))
        xb, yb = _stacks(x, y, batch, rng)
        xt, yt = torch.from_numpy(xb), torch.from_numpy(yb)
        logits = model.slice_logits(xt)
        ce = torch.nn.functional.cross_entropy(logits, yt)
        p = torch.softmax(logits, dim=1)
        onehot = torch.nn.functional.one_hot(yt, 3).permute(0, 3, 1, 2).float()
        inter = (p[:, 1:] * onehot[:, 1:]).sum(dim=(0, 2, 3))
        dice = 1 - ((2 * inter + 1) / (p[:, 1:].sum(dim=(0, 2, 3)) + onehot[:, 1:].sum(dim=(0, 2, 3)) + 1)).mean()
        loss = ce + dice
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        bar.update(1 if max_steps else int(time.perf_counter() - t1) - bar.n)
        hist.append(float(loss.detach()))
        if step % 50 == 0:
            log(f"step {step} t={time.perf_counter() - t1:.0f}s loss {np.mean(hist[-50:]):.3f} "
                f"(ce {float(ce.detach()):.3f} dice {float(dice.detach()):.3f})")
    bar.close()
    t_train = time.perf_counter() - t1

    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "config": {"widths": list(widths)}}, outp / "model.pt")
    summary = {
        "cases": len(paths), "seeds": [0, cases - 1], "steps": step, "batch": batch, "lr": lr, "threads": threads,
        "widths": list(widths), "parameters": n_parameters(model),
        "seconds": {"data": round(t_data, 1), "train": round(t_train, 1), "total": round(time.perf_counter() - t0, 1)},
        "final_loss": float(np.mean(hist[-50:])) if hist else None,
        "recipe": f"python -m scanside.training.zones.train --cases {cases} --minutes {minutes:g} --batch {batch} --lr {lr:g} "
                  f"--out {out}" + (f" --init {init}" if init else ""),
    }
    if init:
        summary = merge_stages(summary, init, keep=("steps", "batch", "lr", "seconds", "recipe"), seconds=("data", "train", "total"))
    (outp / "train.json").write_text(json.dumps(summary, indent=2))
    log(json.dumps(summary))
    return summary


def load_model(path):
    from scanside.training.common import load_checkpoint
    from scanside.training.zones.model import ZoneNet

    return load_checkpoint(path, ZoneNet)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=240)
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget of the training loop")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default="var/zones-run")
    ap.add_argument("--init", default=None, help="continue training from this model.pt")
    a = ap.parse_args(argv)
    train(a.cases, a.minutes, a.out, a.batch, a.lr, threads=a.threads, cache_dir=a.cache_dir, max_steps=a.max_steps,
          init=a.init, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
