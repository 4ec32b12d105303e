"""The `ppll` command line: `ppll train [--config FILE] [--set key=value ...]`, `ppll partition ...` and the rest."""

from __future__ import annotations

import argparse
import sys

from ppll_ext import logs
from ppll_ext.config import ENGINES, RUNTIMES, Config, config_keys, load_config
from ppll_ext.core.block import ON_NAN
from ppll_ext.errors import EXIT_ERROR, ConfigError, PPLLError
from ppll_ext.launchers import apply_launcher_env, is_secondary_rank

FLAGS: dict[str, str] = {
    "local.runtime": "--runtime",
    "train.save_dir": "--save-dir",
    "train.save_every": "--save-every",
    "train.keep": "--keep",
    "train.resume": "--resume",
    "local.engine": "--engine",
    "train.on_nan": "--on-nan",
    "train.trace": "--trace",
}
"""Config keys that `ppll train` also takes as a flag of their own (each flag = --set <key>=...)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppll", description="Pipeline parallelism based on local learning.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model (no arguments: the embedded digits demo)")
    train.add_argument("--config", help="experiment YAML file (see configs/)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.epochs=1 (repeatable)")
    train.add_argument("--runtime", choices=RUNTIMES,
                       help="shortcut for --set local.runtime=...")
    train.add_argument("--save-dir", help="run directory for checkpoints (= --set train.save_dir=...)")
    train.add_argument("--save-every", type=int, help="checkpoint every N steps (= --set train.save_every=N)")
    train.add_argument("--keep", type=int, help="keep the N newest checkpoints (= --set train.keep=N)")
    train.add_argument("--resume", help="checkpoint or run directory to resume from (= --set train.resume=...)")
    train.add_argument("--engine", choices=ENGINES,
                       help="run the stages with ppll_ext's loop, the DeepSpeed adapter or a torch.distributed."
                       "pipelining schedule, local.schedule (= --set local.engine=...)")
    train.add_argument("--on-nan", choices=ON_NAN, help="NaN/inf loss: stop or skip the step (= --set "
                       "train.on_nan=...)")
    train.add_argument("--trace", help="write a Chrome-trace JSON of every stage here (= --set train.trace=...)")
    train.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    part = sub.add_parser("partition", help="show the split a config gives: per stage its layers, parameters and "
                          "predicted seconds (nothing is trained, no data is read)")
    part.add_argument("--config", help="experiment YAML file (see configs/), as for ppll train")
    part.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value, e.g. --set local.partition=profile (repeatable)")
    part.add_argument("--json", dest="json_out", metavar="FILE", help="also write the split and times as JSON here")
    part.add_argument("--no-time", action="store_true", help="uniform / parameters / explicit splits: do not time "
                      "the stages (profile always times)")
    exp = sub.add_parser("export", help="consolidate a checkpoint's shards into model.safetensors")
    exp.add_argument("checkpoint", help="checkpoint directory (or a run directory: its newest checkpoint)")
    exp.add_argument("out", help="output directory")
    exp.add_argument("--max-shard-size", default="5GB", help="split above this size, e.g. 500MB (default 5GB)")
    exp.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    imp = sub.add_parser("import-deepspeed", help="convert a DeepSpeed pipeline checkpoint (layer_XX-model_states.pt) "
                         "of a ppll_ext model to model.safetensors under the unsplit model's names")
    imp.add_argument("checkpoint", help="the directory given to engine.save_checkpoint (its `latest` tag) or a tag dir")
    imp.add_argument("out", help="output directory")
    imp.add_argument("--config", help="experiment YAML of the model the checkpoint was trained from")
    imp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="config override, e.g. --set model.name=resnet32 (repeatable)")
    imp.add_argument("--max-shard-size", default="5GB", help="split above this size, e.g. 500MB (default 5GB)")
    imp.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    ver = sub.add_parser("verify", help="check every file of a checkpoint against the sha256 recorded when it was "
                         "saved")
    ver.add_argument("checkpoint", help="checkpoint directory, or a run directory (each of its step-N checkpoints)")
    gen = sub.add_parser("generate", help="sample text from a trained language model (gpt2 / llama run or export)")
    gen.add_argument("checkpoint", help="checkpoint directory (or a run directory: its newest checkpoint)")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default 200)")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default 0.8)")
    gen.add_argument("--top-k", type=int, default=40, help="sample among the K likeliest tokens (default 40)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: among the likeliest tokens whose "
                     "probabilities sum to P (default 1 = off)")
    gen.add_argument("--exit-stage", type=int, help="decode through stage K's aux head (early exit) instead of the "
                     "whole model")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    plot = sub.add_parser("plot", help="Gantt chart of traces (ppll train --trace), throughput bars or training curves")
    plot.add_argument("traces", nargs="*", help="Chrome-trace JSON files, one subplot each on a shared time axis")
    plot.add_argument("--bench", help="a benchmark results JSON (e.g. benchmarks/results/bench.json): bar chart")
    plot.add_argument("--curves", nargs="+", metavar="RUN",
                      help="run folders (or their metrics.jsonl): loss and accuracy (perplexity) against step and time")
    plot.add_argument("--out", required=True, help="output PNG file")
    plot.add_argument("--window", help="zoom into START:END milliseconds of the traces")
    sub.add_parser("bench", add_help=False, help="every training method side by side: throughput, accuracy, "
                   "language-model quality; results in --out (see ppll bench --help)")
    return parser


def parse_size(text: str) -> int:
    """'500MB' / '5GB' / '1024' -> bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    t = text.strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * factor)
    if t.isdigit():
        return int(t)
    raise ConfigError(f"--max-shard-size {text!r} is not a size such as 500MB or 5GB")


def _export(args: argparse.Namespace) -> int:
    from ppll_ext import checkpoint as ckpt

    ckpt.check_output_folder(args.out, args.overwrite)
    folder = ckpt.resolve(args.checkpoint)
    files = ckpt.export(ckpt.load_model_state(folder), args.out, parse_size(args.max_shard_size), source=folder,
                        overwrite=args.overwrite)
    print(f"exported {len(files)} file(s) to {args.out}: {', '.join(f.name for f in files)}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    """One line per file of the checkpoint(s) (ok, bad, missing, unlisted); a CheckpointError naming every file that
    is not ok."""
    from ppll_ext import checkpoint as ckpt
    from ppll_ext.errors import CheckpointError

    wrong: list[str] = []
    for folder in ckpt.checkpoints(args.checkpoint):
        status = ckpt.verify(folder)
        if status is None:
            ckpt.warn_unverified(folder)
            continue
        for name, state in status.items():
            print(f"{state:<9} {folder / name}")
        wrong += [f"{state} {folder / name}" for name, state in status.items() if state != "ok"]
    if wrong:
        raise CheckpointError(f"{len(wrong)} file(s) differ from {ckpt.CHECKSUMS}: {', '.join(wrong)}; restore them "
                              f"from a copy, or resume from another checkpoint")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from ppll_ext.generate import generate

    result = generate(args.checkpoint, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, exit_stage=args.exit_stage, seed=args.seed)
    print(result.text)
    print(f"generated {result.new_tokens} tokens in {result.seconds:.2f} s ({result.tokens_per_s:.1f} tokens/s) "
          f"through {result.route}", file=sys.stderr)
    return 0


def _train(args: argparse.Namespace) -> int:
    from ppll_ext.runtime.guard import watch_launchers

    watch_launchers()  # a stage process started by a launcher ends with it, never lives on as an orphan
    overrides = list(args.overrides)
    for key, flag in FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_config(args.config, overrides)
    apply_launcher_env(cfg)
    deepspeed = cfg.train.method == "local" and cfg.local.engine == "deepspeed"
    if deepspeed and cfg.local.runtime != "processes":
        raise ConfigError(f"local.engine=deepspeed runs one process per stage; local.runtime={cfg.local.runtime!r} "
                          f"must be processes", key="local.runtime")
    # The training stack is imported only once the config is known to be valid: bad input fails fast.
    from ppll_ext.runtime.launch import spawn_torchrun, under_launcher
    from ppll_ext.train import preflight, run_training
    from ppll_ext.train.job import fail_fast

    if cfg.train.method == "local" and cfg.local.runtime == "processes" and not under_launcher():
        preflight(cfg)
        forwarded = (["--config", args.config] if args.config else []) + [a for o in overrides for a in ("--set", o)]
        return spawn_torchrun(processes(cfg), forwarded)
    try:
        run_training(cfg)
    except BaseException as exc:
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_world_size() > 1:  # no teardown that could hang on a dead peer
            rank = dist.get_rank()
            fail_fast(rank, rank // (cfg.local.data_parallel if deepspeed else 1), exc)
        raise
    return 0


def processes(cfg: Config) -> int:
    """Processes a multi-process `ppll train` starts: one per stage (x local.data_parallel with the DeepSpeed engine;
    local.stages / stages per rank with the torch engine)."""
    if cfg.local.engine == "torch":
        return cfg.local.placement().ranks
    return cfg.local.stages * (cfg.local.data_parallel if cfg.local.engine == "deepspeed" else 1)


def _partition(args: argparse.Namespace) -> int:
    """Print (and with --json write) the split of the config's model and its stages' predicted times."""
    import json

    from ppll_ext.paths import check_output_file, write_atomically
    from ppll_ext.split import format_report, split_report

    cfg = load_config(args.config, args.overrides)
    label = f"--json {args.json_out!r}"
    if args.json_out:
        check_output_file(args.json_out, label, example="split.json")
    report = split_report(cfg, timed=not args.no_time)
    print(format_report(report))
    if args.json_out:
        text = json.dumps(report.to_dict(), indent=2) + "\n"
        write_atomically(args.json_out, lambda tmp: tmp.write_text(text), label, example="split.json")
        print(f"wrote {args.json_out}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from ppll_ext.paths import check_output_file
    from ppll_ext.plot import plot_bench, plot_runs, plot_traces

    if sum(map(bool, (args.traces, args.bench, args.curves))) != 1:
        raise ConfigError("ppll plot takes trace files (a Gantt chart), --bench FILE (a bar chart) or --curves RUN "
                          "[RUN ...] (training curves), exactly one of the three")
    check_output_file(args.out, f"--out {args.out!r}", example="plot.png")
    if args.curves:
        path = plot_runs(args.curves, args.out)
    elif args.bench:
        path = plot_bench(args.bench, args.out)
    else:
        window = None
        if args.window:
            try:
                start, end = (float(v) for v in args.window.split(":"))
            except ValueError as exc:
                raise ConfigError(f"--window {args.window!r} is not START:END in milliseconds, e.g. 0:500") from exc
            window = (start, end)
        path = plot_traces(args.traces, args.out, window)
    print(f"wrote {path}")
    return 0


def _bench(argv: list[str]) -> int:
    from ppll_ext.bench.suite import main as bench

    return bench(argv)


def _import_deepspeed(args: argparse.Namespace) -> int:
    from ppll_ext import checkpoint as ckpt
    from ppll_ext.build import build_layered
    from ppll_ext.data import dataset_shape

    cfg = load_config(args.config, args.overrides)
    ckpt.check_output_folder(args.out, args.overwrite)
    layered = build_layered(cfg, **dataset_shape(cfg.data))
    state, aux = ckpt.import_deepspeed(args.checkpoint, layered)
    files = ckpt.write_imported(state, aux, args.out, parse_size(args.max_shard_size), overwrite=args.overwrite)
    print(f"imported {len(state)} tensors of {layered.name}"
          + (f" and {len({k.split('.')[0] for k in aux})} aux head(s)" if aux else "")
          + f" to {args.out}: {', '.join(str(f.relative_to(args.out)) for f in files)}")
    return 0


def flag_hint(exc: PPLLError) -> str:
    """The command-line spelling of the setting `exc.key` names (its flag and/or --set), appended to the error line."""
    key = exc.key
    if not key:
        return ""
    if "." not in key:  # a Python argument of the library: its config key, if it matches one that has a flag
        key = next((k for k in FLAGS if k.split(".", 1)[1] == key), "")
    if key not in config_keys():
        return ""
    message = str(exc)
    flag = FLAGS.get(key)
    if f"--set {key}=" in message or (flag is not None and flag in message):
        return ""  # the message already says it
    return f" (command line: {flag} or --set {key}=...)" if flag else f" (command line: --set {key}=...)"


def main(argv: list[str] | None = None) -> int:
    """Parse `argv`, run the command; PPLLErrors become one line on stderr and exit code 2."""
    logs.configure()
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "partition":
            return _partition(args)
        if args.command == "export":
            return _export(args)
        if args.command == "verify":
            return _verify(args)
        if args.command == "import-deepspeed":
            return _import_deepspeed(args)
        if args.command == "generate":
            return _generate(args)
        if args.command == "plot":
            return _plot(args)
        if args.command == "bench":
            return _bench(rest)
    except PPLLError as exc:
        if not is_secondary_rank():
            print(f"ppll: error: {exc}{flag_hint(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("ppll: interrupted", file=sys.stderr)
        return 130
    return EXIT_ERROR


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
