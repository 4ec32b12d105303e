"""`ppll bench` in the source tree: the same command line (ppll_ext/bench/suite.py, `ppll bench --help`), results in
benchmarks/results by default, and RESULTS.md of a full run also summarises the other committed results found
there: memory per stage (memory_bench.py), time to accuracy (tta_bench.py) and the adapters run (adapters/).

    python benchmarks/bench.py --data-root CIFAR10_DIR           # the committed RESULTS.md, bench.json, PNGs
    python benchmarks/bench.py --render                          # rewrite RESULTS.md from bench.json
    python benchmarks/bench.py --models gpt2 --batch-size 32 --out benchmarks/results/lm   # the language model
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ppll_ext.bench import suite
from ppll_ext.bench.report import adapters_section
from ppll_ext.errors import EXIT_ERROR, PPLLError

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def memory_section(out: Path) -> list[str]:
    """RESULTS.md's summary of memory_bench.py's memory.json in `out`, with its command and date."""
    if not (out / "memory.json").is_file():
        return []
    import memory_bench

    mem = json.loads((out / "memory.json").read_text())
    m = mem["meta"]
    return ["", "## Memory per stage", "",
            f"`{m['command']}` ({m['date']}, {m['minutes']:.0f} min; every stage, field and method in "
            f"[memory.md](memory.md)). Each cell: the largest stage's total MiB (saved-for-backward peak + "
            f"parameters + gradients + optimizer state + communication buffers), its largest saved peak in "
            f"brackets; bp = the whole model in one process; M = {m['microbatches']} micro-batches, batch "
            f"{m['batch_images']} images / {m['batch_lm']} x 128 tokens; processes+ckpt = PPLL processes with "
            f"local.checkpoint_activations.", "",
            *memory_bench.summary(mem), "", "![largest stage per method](memory.png)"]


def tta_section(out: Path) -> list[str]:
    """RESULTS.md's summary of tta_bench.py's tta.json in `out`, with its command and date."""
    if not (out / "tta.json").is_file():
        return []
    import tta_bench

    tta = json.loads((out / "tta.json").read_text())
    s, m = tta["meta"]["settings"], tta["meta"]
    return ["", "## Time to accuracy", "",
            f"`{m['command']}` ({m['date']}; settings, per-epoch accuracy and conditions in [tta.md](tta.md)): "
            f"{s['model']}, K = 2, full CIFAR-10, {s['epochs']} epochs, the same hyper-parameters, schedule, "
            f"augmentation and data order for every method; training seconds (evaluation excluded) until the "
            f"test accuracy first reaches 60 % and 70 %.", "",
            *tta_bench.table(tta["methods"]), "", *tta_bench.target_lines(tta["target"]), "",
            "![test accuracy vs training seconds](tta.png)"]


def main(argv: list[str] | None = None) -> int:
    """`ppll bench` with this tree's results folder and RESULTS.md sections; a PPLLError is one line, exit code 2."""
    try:
        return suite.main(argv, prog="python benchmarks/bench.py", default_out=str(RESULTS),
                          sections=(memory_section, tta_section, adapters_section))
    except PPLLError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
