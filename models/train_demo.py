"""Train the shipped demo checkpoint: castling_nano on scikit-learn's digits, with the Castling recipe.

    python models/train_demo.py            # writes calib/digits/{train,val}/<label>/*.png once, then trains
    python models/train_demo.py --epochs 5 --out /tmp/quick.pt

Recipe (paper §3.3): both branches are trained; the softmax branch's mask threshold rises from 0.02 to 1.0
(softmax probabilities never exceed 1, so the mask is then all zeros), and the last epochs train the model as it
will be deployed. Folding is then lossless, which `castling-deploy fold` measures rather than assumes.
Deterministic: fixed seeds, one data order, CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from castling_deploy.data import load_image_set  # noqa: E402
from castling_deploy.models import create_model  # noqa: E402
from castling_deploy.models.checkpoint import save_checkpoint  # noqa: E402

DIGITS = ROOT / "calib" / "digits"
PREPROCESS = {"resize": 32, "crop": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
              "interpolation": "bilinear", "channels": "RGB"}
LABELS = [str(i) for i in range(10)]


def export_digits(root: Path = DIGITS, val_fraction: float = 0.2, seed: int = 0) -> None:
    """Write sklearn's 1,797 8x8 digits as PNGs: a seeded stratified split into train/ and val/."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    for label in range(10):
        idx = np.flatnonzero(d.target == label)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        for split, part in (("val", idx[:n_val]), ("train", idx[n_val:])):
            out = root / split / str(label)
            out.mkdir(parents=True, exist_ok=True)
            for i in part:
                img = (d.images[i] * (255.0 / 16.0)).round().astype(np.uint8)
                Image.fromarray(img, mode="L").save(out / f"{i:04d}.png", optimize=True)


def threshold_at(epoch: int, epochs: int) -> float:
    """0.02 for the first 30% of epochs, a linear ramp to 1.0 until 70%, then 1.0 (mask empty)."""
    a, b = int(0.3 * epochs), int(0.7 * epochs)
    if epoch < a:
        return 0.02
    if epoch >= b:
        return 1.0
    return 0.02 + (1.0 - 0.02) * (epoch - a) / max(1, b - a)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to 3 px (digits are centred; this is what generalizes on 1.4k images)."""
    pad = F.pad(x, (3, 3, 3, 3), value=float(x.min()))
    dx, dy = torch.randint(0, 7, (2,), generator=g).tolist()
    return pad[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean() * 100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "models" / "castling_nano_digits.pt")
    args = ap.parse_args()

    if not (DIGITS / "val").exists():
        export_digits()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # small ops: one thread beats two, and is immune to a busy machine
    train = load_image_set(DIGITS / "train", PREPROCESS, LABELS)
    val = load_image_set(DIGITS / "val", PREPROCESS, LABELS)
    xt, yt = torch.from_numpy(train.images), torch.from_numpy(train.labels)
    xv, yv = torch.from_numpy(val.images), torch.from_numpy(val.labels)

    model = create_model("castling_nano", threshold=0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps = args.epochs * math.ceil(len(xt) / args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for epoch in range(args.epochs):
        thr = threshold_at(epoch, args.epochs)
        for a in model.castling_attentions():
            a.threshold = thr
        model.train()
        perm = torch.randperm(len(xt), generator=g)
        total = 0.0
        for i in range(0, len(xt), args.batch):
            idx = perm[i : i + args.batch]
            loss = F.cross_entropy(model(augment(xt[idx], g)), yt[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss) * len(idx)
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            print(f"epoch {epoch + 1:3d}/{args.epochs} threshold {thr:.2f} loss {total / len(xt):.4f} "
                  f"val top-1 {evaluate(model, xv, yv):.2f}%  ({time.time() - t0:.0f}s)", flush=True)
    seconds = time.time() - t0
    model.cfg = model.cfg.with_(threshold=1.0)
    acc = evaluate(model, xv, yv)
    train_info = {
        "command": "python models/train_demo.py" + "".join(f" {a}" for a in sys.argv[1:]),
        "epochs": args.epochs, "seed": args.seed, "seconds": round(seconds, 1),
        "val_top1": acc, "val_set": val.describe(), "train_set": train.describe(),
        "torch": str(torch.__version__),
    }
    save_checkpoint(args.out, model, "castling_nano", PREPROCESS, LABELS, extra={"train": train_info})
    print(json.dumps(train_info, indent=2))


if __name__ == "__main__":
    main()
