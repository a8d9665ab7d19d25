"""`python -m fastmlp ...` (and `torchrun --nproc_per_node=N -m fastmlp train ...`): the fastmlp command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
