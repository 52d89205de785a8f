"""The layer suite of frod-bench, for those who look in bench/: one FRoD layer, forward+backward, frod_linear on each
backend against PEFT's FRoD, PEFT LoRA r=32 and a frozen nn.Linear. Takes frod-bench's options, for example

    python bench/layer.py --shapes 1024x1024 --tokens 8,2048 --out bench_out/layer
"""

import sys

from frod_kernels.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["--suite", "layer", *sys.argv[1:]]))
