"""Write the example's data and starting weights: sklearn digits split non-IID over devices, as .npz files.

Usage: ``python prepare.py [--out DIR] [--devices 8] [--epochs 30] [--small]``. Writes into DIR (default: this
folder): ``devices/dev00.npz`` ... (one per device: float ``x`` (N, 1, 8, 8) in [0, 1], int ``y``; each device's
labels drawn from a Dirichlet(0.5) mix, so devices see mostly a few digits), ``proxy.npz`` (the coordinator's
calibration and pretraining data, 10% of the digits, on no device), ``test.npz`` (20%, held out for
``evaluation: {data: test.npz}`` and ``tinyfleet eval``) and ``weights.pt`` (the model's state dict after
``--epochs`` fp32 epochs on the proxy set only: a weak start the fleet improves). ``--small`` keeps 40 samples per
device (for tests). Seeded: the same command writes the same files.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from model import DigitsCNN
from sklearn.datasets import load_digits


def split(y: np.ndarray, devices: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Sample indices per device: each class's samples dealt to devices in Dirichlet(alpha) proportions."""
    parts: list[list[int]] = [[] for _ in range(devices)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        cuts = (np.cumsum(rng.dirichlet([alpha] * devices)) * len(idx)).astype(int)[:-1]
        for d, chunk in enumerate(np.split(idx, cuts)):
            parts[d] += chunk.tolist()
    return [rng.permutation(np.array(p, dtype=int)) for p in parts]


def pretrain(x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> DigitsCNN:
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        for idx in torch.randperm(len(yt)).split(32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration: smaller = more skewed")
    ap.add_argument("--small", action="store_true", help="40 samples per device (tests)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8) in [0, 1]
    y = digits.target.astype(np.int64)
    order = rng.permutation(len(y))
    n_proxy, n_test = len(y) // 10, len(y) // 5
    proxy, test, rest = order[:n_proxy], order[n_proxy:n_proxy + n_test], order[n_proxy + n_test:]
    dev_dir = args.out / "devices"
    dev_dir.mkdir(parents=True, exist_ok=True)
    for old in dev_dir.glob("dev*.npz"):
        old.unlink()
    for d, idx in enumerate(split(y[rest], args.devices, args.alpha, rng)):
        idx = rest[idx][:40] if args.small else rest[idx]
        np.savez(dev_dir / f"dev{d:02d}.npz", x=x[idx], y=y[idx])
        print(f"devices/dev{d:02d}.npz: {len(idx)} samples, labels {np.bincount(y[idx], minlength=10).tolist()}")
    np.savez(args.out / "proxy.npz", x=x[proxy], y=y[proxy])
    np.savez(args.out / "test.npz", x=x[test], y=y[test])
    model = pretrain(x[proxy], y[proxy], args.epochs, args.seed)
    torch.save(model.state_dict(), args.out / "weights.pt")
    with torch.no_grad():
        acc = (model(torch.from_numpy(x[test])).argmax(1).numpy() == y[test]).mean()
    print(f"proxy.npz: {len(proxy)}, test.npz: {len(test)}; weights.pt: fp32 test accuracy {acc:.3f} "
          f"after {args.epochs} epochs on the proxy set")


if __name__ == "__main__":
    main()
