"""Build the example model shipped inside liftir (liftir/data/digits.onnx, digits.npy).

An All-Conv style network (Springenberg et al. 2014: only convolutions, a strided conv
instead of pooling, global average pooling) trained for a few seconds on scikit-learn's
bundled 8x8 digits, exported to ONNX, plus 16 held-out digits to explain. Small enough to
ship (a few tens of kB), real enough that attributions mean something. Needs torch and
scikit-learn; run once: `python examples/shipped/make_digits_example.py`.
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import onnx
import torch
from sklearn.datasets import load_digits
from torch import nn

DATA = Path(__file__).resolve().parents[2] / "liftir" / "data"


def all_conv(width: int = 16) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, stride=2), nn.ReLU(),  # 8x8 -> 4x4, no pooling
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(2 * width, 10, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8) in [0, 1]
    y = digits.target
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    train, test = order[:1500], order[1500:]
    model = all_conv()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    for _ in range(args.epochs):
        for batch in torch.randperm(len(train)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[batch]), yt[batch]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(x[test])).argmax(1).numpy() == y[test]).mean()
    buffer = io.BytesIO()
    torch.onnx.export(model, (xt[:1],), buffer, dynamo=False, opset_version=17, input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}})
    proto = onnx.load_from_string(buffer.getvalue())
    proto.doc_string = f"All-Conv net on scikit-learn digits; held-out accuracy {accuracy:.3f}"
    args.out.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, args.out / "digits.onnx")
    np.save(args.out / "digits.npy", x[test[:16]])
    print(f"held-out accuracy {accuracy:.3f}; wrote {args.out / 'digits.onnx'} and digits.npy "
          f"(labels {y[test[:16]].tolist()})")


if __name__ == "__main__":
    main()
