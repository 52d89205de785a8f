"""Projection setup, side by side, at a chosen model size: PEFT's ``get_peft_model(model, FrodConfig(...))``
against ``frod_kernels.projections.build_projections`` and PEFT under ``frod_kernels.peft.enable()``, each method
in its own process. The implementation is frod-bench's init suite; this is its command line for those who look in
bench/ (the same as ``python -m frod_kernels.bench.init_cli``; ``--help`` for the options), for example

    python bench/init_projections.py --hidden 2048 --layers 16 --eigen-check
    python bench/init_projections.py --device cuda --hidden 4096 --layers 32 --methods frod_kernels --json out.json
"""

import sys

from frod_kernels.bench.init_cli import main

if __name__ == "__main__":
    sys.exit(main())
