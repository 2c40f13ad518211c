"""The ``sketchpass`` command line (thin: everything it does is in the Python API)."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    """Build SK layers from dense ones and print their errors and parameter counts."""
    import torch
    from rich.console import Console
    from rich.table import Table
    from torch import nn

    import sketchpass as sp
    from sketchpass.sketch.fit import expected_sketch_error, relative_error

    console = Console()
    torch.manual_seed(args.seed)
    d_in, d_out, n = 256, 128, 2048
    # Inputs with a decaying spectrum, like real activations, and a weight trained on them.
    X = torch.randn(n, d_in) @ torch.diag(torch.logspace(0, -1.5, d_in))
    dense = nn.Linear(d_in, d_out)
    gram = X.double().T @ X.double()
    table = Table(title=f"nn.Linear({d_in}, {d_out}) → sketch factors (k·l = m rows)")
    for col in ("form", "m / rank", "params", "of dense", "rel. weight err", "rel. output err", "predicted"):
        table.add_column(col, justify="right")
    dense_params = sum(p.numel() for p in dense.parameters())
    table.add_row("dense", "-", f"{dense_params:,}", "100%", "0", "0", "-")
    W = dense.weight
    for m in (16, 32, 64):
        rows = [("sketch (paper)", sp.SKLinear.from_dense(dense, k=m, init="sketch", seed=args.seed),
                 expected_sketch_error(d_in, d_out, m, 1)),
                ("sketch lstsq", sp.SKLinear.from_dense(dense, k=m, init="lstsq", seed=args.seed), None),
                ("sketch calibrated", sp.SKLinear.from_dense(dense, k=m, init="calibrated", gram=gram,
                                                             seed=args.seed), None)]
        rank = sp.sketch.cost.sketch_params(d_out, d_in, m) // (d_in + d_out)
        rows.append(("whitened svd", sp.LowRankLinear.from_dense(dense, rank, gram=gram), None))
        for label, layer, predicted in rows:
            with torch.no_grad():
                w_err = relative_error(W, layer.materialize())
                out_err = relative_error(W, layer.materialize(), gram)
            params = sum(p.numel() for p in layer.parameters())
            table.add_row(label, str(m if "sketch" in label else rank), f"{params:,}",
                          f"{params / dense_params:.0%}", f"{w_err:.3f}", f"{out_err:.3f}",
                          "-" if predicted is None else f"{predicted:.3f}")
    console.print(table)
    console.print("Errors are relative squared errors ‖Ŵ−W‖²/‖W‖² (weight) and ‖(Ŵ−W)X‖²/‖WX‖² (output on "
                  f"{n} inputs); 'predicted' is the paper's E‖Ŵ−W‖²/‖W‖² for its unbiased projection.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sketchpass", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the built-in example")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("sketchpass: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line unless --debug
        if args.debug:
            raise
        print(f"sketchpass: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
