"""Entry point that torchrun starts in each process of tests/train/test_distributed.py: the `lmforge` CLI."""
import sys

from lmforge.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
