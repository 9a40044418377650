"""Linear-probe fitting: L-BFGS to the optimum (``tokenizer.probe.fit_linear_probe``) against 300 full-batch Adam
steps (the probe's fit before; NOTES.md, session 29), on the same features, in one run.

    python scripts/bench/probe.py [--checkpoint runs/quickstart/wintok --data runs/quickstart/data/shapeworld]

With a WinTok and a ShapeWorld dataset: the probe's own features (semantic and pixel tokens of 3,000 training
scenes) and its eight fits; without them, correlated random features of the same size. Prints the seconds of both
fits, their ratio, and each fit's objective (the lower, the nearer the optimum) and test accuracy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tokenizer.probe import fit_linear_probe, probe_objective, standardise  # noqa: E402


def adam_probe(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decay: float = 1e-3) -> torch.nn.Linear:
    torch.manual_seed(0)
    linear = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(linear(x), y).backward()
        opt.step()
    return linear


def problems(args) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(name, train x, test x, train y, test y), standardised on the training features."""
    raw = []
    if args.checkpoint:
        from tokenizer.model import WinTok
        from tokenizer.probe import probe_tasks

        _, _, tasks = probe_tasks(WinTok.from_checkpoint(args.checkpoint).freeze(), args.data)
        for task, inputs in tasks.items():
            if isinstance(inputs, str):  # too few scenes: the probe skips it too
                continue
            feats, y_tr, y_te = inputs
            raw += [(f"{task}/{kind}", x_tr, y_tr, x_te, y_te) for kind, (x_tr, x_te) in feats.items()]
    else:
        g = torch.Generator().manual_seed(0)
        for name in ("random/a", "random/b"):
            z = torch.randn(3600, 64, generator=g)
            x = z @ torch.randn(64, 2048, generator=g) + 0.1 * torch.randn(3600, 2048, generator=g)
            y = (z[:, :4] + 0.5 * torch.randn(3600, 4, generator=g)).argmax(1)
            raw.append((name, x[:3000], y[:3000], x[3000:], y[3000:]))
    return [(name, *standardise(xt, xe), yt, ye) for name, xt, yt, xe, ye in raw]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a WinTok (with --data): the probe's own features")
    p.add_argument("--data", default=None, help="ShapeWorld dataset directory")
    args = p.parse_args()
    if bool(args.checkpoint) != bool(args.data):
        p.error("--checkpoint and --data go together")
    totals = {"lbfgs": 0.0, "adam": 0.0}
    for name, xt, xe, yt, ye in problems(args):
        classes = int(max(yt.max(), ye.max())) + 1
        row = []
        for kind, fit in (("lbfgs", fit_linear_probe), ("adam", adam_probe)):
            t0 = time.perf_counter()
            linear = fit(xt, yt, classes)
            totals[kind] += time.perf_counter() - t0
            with torch.no_grad():
                row.append(f"{kind} objective {probe_objective(linear, xt, yt, 1e-3).item():.4f} "
                           f"acc {(linear(xe).argmax(1) == ye).float().mean().item():.3f}")
        print(f"{name:18s} " + " | ".join(row))
    print(f"fits: L-BFGS {totals['lbfgs']:.1f} s, 300 Adam steps {totals['adam']:.1f} s → "
          f"{totals['adam'] / totals['lbfgs']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
