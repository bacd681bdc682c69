"""``python -m memlens`` (and ``torchrun ... -m memlens``): the command line."""

from memlens.cli import main

main()
