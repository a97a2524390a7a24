"""Train the reference csPCa model from scratch on simulated cases (CPU, 2 threads).

    python -m scanside.training.cspca.train --cases 320 --minutes 15 --out var/cspca-run

1. Cases: ``scanside.training.cspca.data.build_cache`` renders seeds 0..N-1 once (npz, var/cspca-cache/KEY/, KEY = data.cache_key(): rebuilt when the simulator or preprocessing changes).
2. Voxel head: patches of 20 x 32 x 32 voxels (the full depth, a quarter of the plane; half of
   them centred near a csPCa lesion when the case has one, each of its lesions equally often), random left-right flips and channel
   intensity jitter; loss = BCE + soft Dice on the csPCa lesion mask (indolent lesions are
   background) + BCE of the patch's max-voxel (multiple-instance) exam head on "the patch holds a
   csPCa lesion". Training runs for a wall-clock budget with a cosine learning-rate schedule over it,
   or over ``--max-steps`` when that is given (reproducible on a busy machine; the budget still caps it).
3. Exam head: the scale/offset of sigmoid(a * max voxel logit + b) are refitted on the full
   training volumes by logistic regression (Newton, 2 parameters), so the exam probability is
   calibrated on whole exams rather than patches.

Writes <out>/model.pt (state dict + config) and <out>/train.json (timings, losses).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from scanside.agent.service.progress import progress

from scanside.training.common import merge_stages

PATCH = (20, 32, 32)


def lesion_voxels(y: np.ndarray) -> list:
    """Per case, the voxel indices of each csPCa lesion (26-connected component of the mask)."""
    from scipy import ndimage

    out = []
    for yi in y:
        comps, n = ndimage.label(yi, structure=np.ones((3, 3, 3), dtype=bool))
        out.append([np.argwhere(comps == c) for c in range(1, n + 1)])
    return out


def _patches(x: np.ndarray, y: np.ndarray, idx: np.ndarray, rng: np.random.Generator, lesions: list):
    """Crop PATCH from each selected case: centred near a csPCa lesion half the time if the case has one.
    The lesion is drawn uniformly, then a voxel in it, so a 9 mm lesion is seen as often as a 20 mm one
    (a voxel drawn over the whole mask picks the large lesions of a case almost every time)."""
    D, H, W = x.shape[2:]
    ph, pw = PATCH[1], PATCH[2]
    xs, ys = [], []
    for i in idx:
        yi = y[i]
        if lesions[i] and rng.random() < 0.5:
            pts = lesions[i][rng.integers(len(lesions[i]))]
            c = pts[rng.integers(len(pts))]
            h0 = int(np.clip(c[1] - ph // 2 + rng.integers(-8, 9), 0, H - ph))
            w0 = int(np.clip(c[2] - pw // 2 + rng.integers(-8, 9), 0, W - pw))
        else:
            h0 = int(rng.integers(0, H - ph + 1))
            w0 = int(rng.integers(0, W - pw + 1))
        xp = x[i, :, :, h0:h0 + ph, w0:w0 + pw].astype(np.float32)
        yp = yi[:, h0:h0 + ph, w0:w0 + pw].astype(np.float32)
        if rng.random() < 0.5:  # left-right flip (axis W runs to patient left)
            xp, yp = xp[..., ::-1], yp[..., ::-1]
        xp = xp * rng.uniform(0.9, 1.1, size=(3, 1, 1, 1)) + rng.normal(0, 0.1, size=(3, 1, 1, 1))
        xs.append(np.ascontiguousarray(xp))
        ys.append(np.ascontiguousarray(yp))
    return np.stack(xs).astype(np.float32), np.stack(ys)[:, None]


def fit_exam_head(peaks: np.ndarray, labels: np.ndarray, iters: int = 100, l2: float = 1.0) -> tuple[float, float]:
    """Logistic regression p = sigmoid(a * peak + b), ridge ``l2`` on (a, b), by Newton's method with a
    backtracking line search. The peaks are voxel logits (tens in size) and the training cases nearly
    separable, so a full Newton step from the start overshoots into saturation and never comes back
    (seen: a = 6260 on 512 cases); halving the step until the penalised loss falls converges to the same
    unique minimum wherever the full step did."""
    X = np.stack([peaks, np.ones_like(peaks)], axis=1).astype(np.float64)
    t = labels.astype(np.float64)

    def loss(w):  # penalised negative log-likelihood, overflow-free
        z = X @ w
        return float(np.sum(np.logaddexp(0.0, z) - t * z) + 0.5 * l2 * w @ w)

    w = np.array([1.0, 0.0])
    f = loss(w)
    for _ in range(iters):
        p = 0.5 * (1.0 + np.tanh(0.5 * (X @ w)))  # sigmoid without overflow
        g = X.T @ (p - t) + l2 * w
        Hm = (X * (p * (1 - p))[:, None]).T @ X + l2 * np.eye(2)
        step = np.linalg.solve(Hm, g)
        s, f_new = 1.0, loss(w - step)
        while f_new > f - 1e-4 * s * (g @ step) and s > 1e-10:
            s *= 0.5
            f_new = loss(w - s * step)
        w, f = w - s * step, f_new
        if np.abs(s * step).max() < 1e-8:
            break
    return float(w[0]), float(w[1])


def train(cases: int = 320, minutes: float = 15.0, out: str = "var/cspca-run", batch: int = 8, lr: float = 3e-3,
          seed: int = 0, threads: int = 2, cache_dir: Optional[str] = None, max_steps: Optional[int] = None,
          widths=(12, 24, 48), calib_cases: Optional[int] = None, init: Optional[str] = None,
          recipe: Optional[str] = None, log=print) -> dict:
    import os

    import torch

    from scanside.training.cspca.data import DEFAULT_CACHE, build_cache, load_cache
    from scanside.training.cspca.model import CspcaNet, n_parameters

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    load_start = [round(v, 2) for v in os.getloadavg()]  # the card says whether the machine was shared
    t0 = time.perf_counter()
    paths = build_cache(range(cases), cache_dir or DEFAULT_CACHE, workers=threads)
    t_data = time.perf_counter() - t0
    x, y, labels = load_cache(paths)
    lesions = lesion_voxels(y)
    log(f"{len(paths)} cases ({int(labels.sum())} csPCa, {sum(map(len, lesions))} csPCa lesions), data {t_data:.0f} s")

    model = CspcaNet(widths=tuple(widths))
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
        # the schedule follows the step budget where one is given (the same run on a busy or a quiet
        # machine), else the wall clock; the wall-clock budget always caps the run
        frac = (time.perf_counter() - t1) / budget
        if max_steps:
            frac = max(frac, step / max_steps)
        if frac >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = lr * (0.02 + 0.98 * 0.5 * (1 + np.cos(np.pi * min(frac, 1.0))))
        idx = rng.integers(0, len(x), size=batch)
        xb, yb = _patches(x, y, idx, rng, lesions)
        xt, yt = torch.from_numpy(xb), torch.from_numpy(yb)
        vox, exam = model.logits(xt)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(vox, yt, pos_weight=torch.tensor(5.0))
        p = torch.sigmoid(vox)
        inter = (p * yt).sum()
        dice = 1 - (2 * inter + 1) / (p.sum() + yt.sum() + 1)
        patch_label = (yt.flatten(1).amax(1, keepdim=True) > 0).float()
        exam_bce = torch.nn.functional.binary_cross_entropy_with_logits(exam, patch_label)
        loss = bce + dice + 0.5 * exam_bce
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        bar.update(1 if max_steps else int(time.perf_counter() - t1) - bar.n)
        hist.append(float(loss.detach()))
        if step % 25 == 0:
            log(f"step {step} t={time.perf_counter() - t1:.0f}s loss {np.mean(hist[-25:]):.3f} "
                f"(bce {bce.item():.3f} dice {dice.item():.3f} exam {exam_bce.item():.3f})")
    bar.close()
    t_train = time.perf_counter() - t1

    # exam head on full volumes
    t2 = time.perf_counter()
    model.eval()
    n_cal = len(x) if calib_cases is None else min(calib_cases, len(x))
    peaks = []
    with torch.no_grad():
        for i0 in range(0, n_cal, 8):
            vox, _ = model.logits(torch.from_numpy(x[i0:min(i0 + 8, n_cal)].astype(np.float32)))
            peaks.append(vox.amax(dim=(1, 2, 3, 4)).numpy())
    peaks_a = np.concatenate(peaks)
    a, b = fit_exam_head(peaks_a, labels[:n_cal])
    with torch.no_grad():
        model.exam_scale.fill_(a)
        model.exam_bias.fill_(b)
    t_cal = time.perf_counter() - t2

    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    config = {"widths": list(widths), "patch": list(PATCH)}
    torch.save({"state_dict": model.state_dict(), "config": config}, outp / "model.pt")
    summary = {
        "cases": len(paths), "csPCa_cases": int(labels.sum()), "steps": step, "batch": batch, "lr": lr,
        "threads": threads, "widths": list(widths), "parameters": n_parameters(model),
        "seconds": {"data": round(t_data, 1), "train": round(t_train, 1), "exam_head": round(t_cal, 1),
                    "total": round(time.perf_counter() - t0, 1)},
        "final_loss": float(np.mean(hist[-50:])) if hist else None,
        "exam_head": {"scale": a, "bias": b, "fit_cases": n_cal},
        "loadavg": {"start": load_start, "end": [round(v, 2) for v in os.getloadavg()]},
    }
    if recipe:
        summary["recipe"] = recipe
    if init:
        summary = merge_stages(summary, init, keep=("steps", "batch", "lr", "seconds", "recipe", "loadavg"),
                               seconds=("data", "train", "exam_head", "total"))
    (outp / "train.json").write_text(json.dumps(summary, indent=2))
    log(json.dumps(summary))
    return summary


def load_model(path):
    from scanside.training.common import load_checkpoint
    from scanside.training.cspca.model import CspcaNet

    return load_checkpoint(path, CspcaNet)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=320)
    ap.add_argument("--minutes", type=float, default=15.0, help="wall-clock budget of the patch training")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default="var/cspca-run")
    ap.add_argument("--init", default=None, help="continue training from this model.pt")
    a = ap.parse_args(argv)
    recipe = "python -m scanside.training.cspca.train " + " ".join(sys.argv[1:] if argv is None else argv)
    train(a.cases, a.minutes, a.out, a.batch, a.lr, threads=a.threads, cache_dir=a.cache_dir, max_steps=a.max_steps,
          init=a.init, recipe=recipe, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
