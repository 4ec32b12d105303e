"""`python -m ppll_ext.runtime.torchrun PARENT_PID TORCHRUN_ARGS...`: the torchrun that `ppll train` spawns.

It is torchrun (torch.distributed.run) with three differences: it dies with `ppll train` (a parent-death signal,
so a killed `ppll train` leaves nothing running), its own log lines are kept to errors of the launcher itself,
and a failed stage ends it with that stage's exit code (2 for a ppll_ext error) instead of torchrun's
ChildFailedError traceback, since the stage has already said in one line what went wrong.
"""

from __future__ import annotations

import logging
import signal
import sys

from ppll_ext.runtime.guard import die_with_parent


def main(argv: list[str]) -> int:
    """Run torchrun with `argv[1:]` as the child of process `argv[0]`; returns the exit code of the run."""
    die_with_parent(int(argv[0]), signal.SIGTERM)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(parse_args(argv[1:]))
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
