"""Run a family of multi-process cases in ONE launch: every process runs each case in turn, as if the launcher had
started the case's own script (or module) with the case's arguments.

    torchrun --nproc_per_node 2 tests/dist/family.py PLAN.json
    launch/deepspeed.sh 2 tests/dist/family.py PLAN.json

PLAN.json: {"out": DIR, "cases": [{"name": NAME, "script": PATH | "module": NAME, "args": [...]}, ...]}. Each case
runs its script's `__main__` (runpy) in this process, with sys.argv set as its launcher would set it (the deepspeed
launcher's `--local_rank=N` first); each case's script joins and leaves the process group itself. File descriptors 1
and 2 go to DIR/NAME/rank<R>.out and .err while it runs, and its exit status is written to DIR/NAME/rank<R>.rc. A
case that exits non-zero ends this process with its status, so the launcher stops the others: later cases, which
may depend on its files, do not run. Launching costs each test process imports of torch (and DeepSpeed) and the
launcher's own start; one launch per family pays that once.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import traceback
from pathlib import Path


def run_case(case: dict, local_rank: list[str]) -> int:
    """Run one case's script or module as `__main__`; its exit status (an uncaught exception prints its
    traceback, as the interpreter would, and gives 1)."""
    target = case.get("script") or case["module"]
    sys.argv = [target, *local_rank, *case["args"]]
    try:
        if "script" in case:
            sys.path.insert(0, str(Path(target).resolve().parent))
            runpy.run_path(target, run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    except BaseException:  # reported as the interpreter would report it; then the family stops
        traceback.print_exc()
        return 1
    return 0


def fresh_group_names(number: int) -> None:
    """Name the process groups case `number` creates apart from every earlier case's.

    torch names groups by a counter that destroy_process_group() resets, while the rendezvous store can outlive the
    group (torchrun's agent keeps its own): a second case's first new_group() met the first case's keys in the store
    and waited for peers that had left (seen under both launchers). A thousand names per case keeps them apart.
    """
    from torch.distributed import distributed_c10d

    distributed_c10d._world.group_count = 1000 * number


def main() -> None:
    local_rank = [a for a in sys.argv[1:] if a.startswith(("--local_rank", "--local-rank"))]
    plan = json.loads(Path(next(a for a in sys.argv[1:] if a not in local_rank)).read_text())
    out = Path(plan["out"])
    rank = os.environ["RANK"]
    saved = os.dup(1), os.dup(2)
    argv, path = list(sys.argv), list(sys.path)
    for number, case in enumerate(plan["cases"]):
        fresh_group_names(number)
        folder = out / case["name"]
        folder.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        with open(folder / f"rank{rank}.out", "wb") as o, open(folder / f"rank{rank}.err", "wb") as e:
            os.dup2(o.fileno(), 1)
            os.dup2(e.fileno(), 2)
            try:
                code = run_case(case, local_rank)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                sys.argv, sys.path[:] = list(argv), path
        (folder / f"rank{rank}.rc").write_text(str(code))
        if code != 0:
            print(f"family: case {case['name']} exited {code} on rank {rank}; the family stops", file=sys.stderr,
                  flush=True)
            sys.exit(code)


if __name__ == "__main__":
    main()
