"""Every (family, method) pair of tests/test_deploy.py exported to ONNX with a dynamic batch
(traced at batch 2) and run by onnxruntime at batch 3, compared with eager PyTorch; and
compiled with ``torch.compile(fullgraph=True)`` (inductor), compared with eager at batch 2.
CI exports a few of these (an export takes 15-25 s); this script checks all of them.

    python benchmarks/deploy_matrix.py [--no-inductor]   (inductor: about a minute per pair on 2 CPU cores)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_deploy import BUILDERS, CASES, SIZE

import tokensparse
from tokensparse.export import TensorOutputs, export_onnx


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-inductor", action="store_true", help="skip the inductor compile (slow on CPU)")
    args = p.parse_args()
    print(f"{'family':<10} {'method':<24} {'onnx max diff':>14} {'export s':>9} {'inductor max diff':>18} {'compile s':>10}")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for family, spec in CASES:
            torch.manual_seed(0)
            model = tokensparse.patch(BUILDERS[family]().eval(), spec).eval()
            size = SIZE.get(family, 32)
            t = time.perf_counter()
            report = export_onnx(model, Path(tmp) / "m.onnx", batch_size=2, image_size=(size, size))
            export_s = time.perf_counter() - t
            compiled, compile_s = "-", "-"
            if not args.no_inductor:
                x = torch.randn(2, 3, size, size)
                wrapped = TensorOutputs(model).eval()
                torch._dynamo.reset()
                t = time.perf_counter()
                with torch.no_grad():
                    got, want = torch.compile(wrapped, fullgraph=True)(x), wrapped(x)
                diff = max(float((a - b).abs().max()) for a, b in zip(got, want))
                worst = max(worst, diff)
                compiled, compile_s = f"{diff:.2g}", f"{time.perf_counter() - t:.1f}"
            worst = max(worst, report.max_difference)
            print(f"{family:<10} {spec:<24} {report.max_difference:>14.2g} {export_s:>9.1f} {compiled:>18} "
                  f"{compile_s:>10}", flush=True)
    print(f"{len(CASES)} pairs; largest difference from eager: {worst:.2g} (bound 1e-4)")
    if not worst <= 1e-4:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
