"""Train the small BPNet-style model shipped as liftir/data/genome_gata_tal1.onnx.

Run once (about two minutes on one CPU core; validation r = 0.90); the tests use the shipped ONNX file, never a
model trained on the machine that runs them. Usage:

    python examples/genome/train_small_model.py --out liftir/data/genome_gata_tal1.onnx
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn

from liftir.genome.synthetic import training_set

LENGTH = 200


class SmallBPNet(nn.Module):
    """Conv (16 filters, width 11) -> 2 dilated residual convs -> sum over positions ->
    a linear counts head: BPNet's counts branch in miniature."""

    def __init__(self, filters: int = 16):
        super().__init__()
        self.stem = nn.Conv1d(4, filters, 11, padding=5)
        self.dilated = nn.ModuleList(nn.Conv1d(filters, filters, 3, padding=d, dilation=d)
                                     for d in (2, 4))
        self.head = nn.Linear(filters, 1)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        for conv in self.dilated:
            h = h + torch.relu(conv(h))
        return self.head(h.sum(dim=2) / 20.0)  # a scaled sum: counts grow with the sites


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="liftir/data/genome_gata_tal1.onnx")
    parser.add_argument("--steps", type=int, default=2500)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x, y = training_set(8000, LENGTH, seed=0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model = SmallBPNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for step in range(args.steps):
        idx = torch.from_numpy(rng.integers(0, len(x), 128))
        loss = nn.functional.mse_loss(model(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"step {step}: mse {loss.item():.4f}", flush=True)
    xv, yv = training_set(1000, LENGTH, seed=1)
    with torch.no_grad():
        pred = model(torch.from_numpy(xv)).numpy()
    print(f"validation mse {np.mean((pred - yv) ** 2):.4f}, "
          f"r {np.corrcoef(pred[:, 0], yv[:, 0])[0, 1]:.3f}")
    model.eval()
    torch.onnx.export(model, (torch.zeros(1, 4, LENGTH),), args.out, input_names=["sequence"],
                      output_names=["log_counts"], dynamic_axes={"sequence": {0: "N"}},
                      opset_version=17, dynamo=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
