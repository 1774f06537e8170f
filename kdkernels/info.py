"""`python -m kdkernels.info`: build (if needed) and report the compiled backends.

Prints, for each backend, whether it loads here and why not; for the C++ extensions, what they
were built for (CPU capability, CUDA archs), where the cache is, and how long the load (or
first build) took. Exit status 0 even when a backend is missing: the report is the product.
Options: --no-cuda-build  do not compile the CUDA extension when it is not cached.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def _try(label: str, fn) -> str:
    start = time.perf_counter()
    try:
        lib = fn()
    except ImportError as err:
        return f"{label}: MISSING - {err}"
    return f"{label}: ok ({time.perf_counter() - start:.1f} s) {lib}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdkernels.info", description=__doc__)
    parser.add_argument("--no-cuda-build", action="store_true",
                        help="skip the CUDA extension build (same as KDKERNELS_SKIP_CUDA=1)")
    args = parser.parse_args(argv)
    if args.no_cuda_build:
        os.environ["KDKERNELS_SKIP_CUDA"] = "1"

    from .backends import extension as _build
    from .backends import registry

    cuda_dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), python "
          f"{sys.version.split()[0]}, {torch.get_num_threads()} threads, GPU: {cuda_dev}")
    for key, value in _build.describe().items():
        print(f"  {key}: {value}")
    print("extensions:")
    print("  " + _try("cpu extension", _build.load_cpu))
    print("  " + _try("cuda extension", _build.load_cuda))
    print("backends:")
    for name, state in registry.available().items():
        print(f"  {name}: {state}")
    for device, order in registry.AUTO_ORDER.items():
        print(f"  impl='auto' on {device}: first available of {', '.join(order)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
