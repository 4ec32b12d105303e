"""`python -m ppll_ext ...` = `ppll ...`."""

from ppll_ext.cli import entry

entry()
