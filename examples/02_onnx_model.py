"""Compress an ONNX file: export a CNN to ONNX, compress the file with calibration data from an .npz,
and compare the two files' accuracy in ONNX Runtime.

Run:  python examples/02_onnx_model.py [--budget params=0.25] [--workdir DIR]
The same as a command:  sketchpass compress cnn.onnx -o cnn-small.onnx --budget params=0.25 --calib calib.npz
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import sketchpass as sp
import sketchpass.onnx as spx
from sketchpass.demo.data import mnist_tensors
from sketchpass.demo.models import load_mnist_cnn


def accuracy(path, x, y):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    pred = np.concatenate([sess.run(None, {name: x[i:i + 1000]})[0].argmax(1) for i in range(0, len(x), 1000)])
    return 100.0 * float((pred == y).mean())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", default="params=0.25")
    ap.add_argument("--workdir", default=None, help="where to write the files (default: a temporary folder)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sketchpass-onnx-"))
    work.mkdir(parents=True, exist_ok=True)

    model = load_mnist_cnn()
    src = work / "cnn.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(src), dynamo=False, input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    x_cal, _ = mnist_tensors("train", n=1024)
    np.savez(work / "calib.npz", image=x_cal.numpy())          # one array per model input, named like it

    small = sp.transform(str(src), args.budget, calib=str(work / "calib.npz"))   # ONNX in -> ONNX out
    out = spx.save(small, work / "cnn-small.onnx")              # atomic write; external data above 2 GB
    plan = spx.plan_of(small)                                   # the plan travels in the file's metadata
    print(plan.report())

    x_test, y_test = mnist_tensors("test")
    x, y = x_test.numpy(), y_test.numpy()
    print(f"{src.name}: {src.stat().st_size:,} bytes, {accuracy(src, x, y):.2f}% | {out.name}: "
          f"{out.stat().st_size:,} bytes, {accuracy(out, x, y):.2f}% (ONNX Runtime, 10,000 test images)")
    print(f"files in {work}")


if __name__ == "__main__":
    main()
