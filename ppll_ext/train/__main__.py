"""`python -m ppll_ext.train ...` = `ppll train ...` (the form `accelerate launch -m` and torchrun use)."""

import sys

from ppll_ext.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
