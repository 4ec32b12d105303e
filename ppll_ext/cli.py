"""The `ppll` command line: `ppll train [--config FILE] [--set key=value ...]`."""

from __future__ import annotations

import argparse
import sys

from ppll_ext.errors import PPLLError

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppll", description="Pipeline parallelism based on local learning.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model (no arguments: the embedded digits demo)")
    train.add_argument("--config", help="experiment YAML file (see configs/)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.epochs=1 (repeatable)")
    train.add_argument("--runtime", choices=("sequential", "threads", "processes"),
                       help="shortcut for --set local.runtime=...")
    train.add_argument("--save-dir", help="run directory for checkpoints (= --set train.save_dir=...)")
    train.add_argument("--save-every", type=int, help="checkpoint every N steps (= --set train.save_every=N)")
    train.add_argument("--keep", type=int, help="keep the N newest checkpoints (= --set train.keep=N)")
    train.add_argument("--resume", help="checkpoint or run directory to resume from (= --set train.resume=...)")
    train.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser


def _train(args: argparse.Namespace) -> int:
    from ppll_ext.config import load_config
    from ppll_ext.runtime.launch import spawn_torchrun, under_launcher
    from ppll_ext.train import prepare, run_training

    overrides = list(args.overrides)
    for key, value in (("local.runtime", args.runtime), ("train.save_dir", args.save_dir),
                       ("train.save_every", args.save_every), ("train.keep", args.keep),
                       ("train.resume", args.resume)):
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_config(args.config, overrides)
    if cfg.train.method == "local" and cfg.local.runtime == "processes" and not under_launcher():
        prepare(cfg)
        forwarded = (["--config", args.config] if args.config else []) + [a for o in overrides for a in ("--set", o)]
        return spawn_torchrun(cfg.local.stages, forwarded)
    run_training(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse `argv`, run the command; PPLLErrors become one line on stderr and exit code 2."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            return _train(args)
    except PPLLError as exc:
        print(f"ppll: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ppll: interrupted", file=sys.stderr)
        return 130
    return EXIT_USAGE


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
