"""Compress a pretrained PyTorch CNN under a parameter budget and check its accuracy.

The MNIST CNN of the PyPI package ``ccexam`` and MNIST itself are fetched once into the sketchpass
cache.  Run:  python examples/01_pytorch_cnn.py [--budget params=0.25]
"""

import argparse
import time

import torch

import sketchpass as sp
from sketchpass.demo.data import mnist_tensors
from sketchpass.demo.models import load_mnist_cnn


def accuracy(model, x, y):
    with torch.no_grad():
        return 100.0 * sum(int((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum())
                           for i in range(0, len(x), 1000)) / len(x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", default="params=0.25")
    ap.add_argument("--calib-n", type=int, default=1024)
    args = ap.parse_args()

    model = load_mnist_cnn()                                   # an ordinary nn.Module
    x_cal, _ = mnist_tensors("train", n=args.calib_n)          # calibration: training images, no labels
    x_test, y_test = mnist_tensors("test")
    calib = [x_cal[i:i + 128] for i in range(0, len(x_cal), 128)]

    t0 = time.perf_counter()
    plan = sp.plan(model, args.budget, calib=calib)            # decide every layer's form and size
    small = sp.apply(model, plan, calib=calib)                 # fit them (sequential refit); model untouched
    seconds = time.perf_counter() - t0
    print(small.sketchpass_plan.report())                      # the plan with measured errors

    dense_acc, small_acc = accuracy(model, x_test, y_test), accuracy(small, x_test, y_test)
    n_dense = sum(p.numel() for p in model.parameters())
    n_small = sum(p.numel() for p in small.parameters())
    print(f"dense: {dense_acc:.2f}% with {n_dense:,} params; compressed ({args.budget}): {small_acc:.2f}% with "
          f"{n_small:,} params ({n_small / n_dense:.1%}); plan + apply {seconds:.1f} s")

    # the plan is versioned JSON: applying it again rebuilds the same model bit for bit
    again = sp.apply(model, sp.Plan.from_json(plan.to_json()), calib=calib)
    same = all(torch.equal(a, b) for a, b in zip(small.state_dict().values(), again.state_dict().values()))
    print(f"replayed from JSON: identical weights = {same}")


if __name__ == "__main__":
    main()
