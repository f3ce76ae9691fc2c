"""``python -m wsnets.train CONFIG --zoo DIR --out RUN`` (also under ``torchrun --nproc-per-node N``)."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
