"""Configuration: Literal choice fields owned by their modules, per-section checks, `key=` on errors, CLI flag hints."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints

import pytest
import torch

import ppll_ext.config as config_module
from ppll_ext.cli import FLAGS, flag_hint, main
from ppll_ext.config import (
    AUTOCAST_MODES,
    DEVICES,
    ENGINES,
    METHODS,
    OPTIMIZERS,
    RUNTIMES,
    SCHEDULES,
    Config,
    DataConfig,
    LocalConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    check_device,
    config_keys,
    load_config,
    parse_override,
    validate,
)
from ppll_ext.core.aux_heads import AUX_KINDS
from ppll_ext.core.block import AUTOCAST, ON_NAN
from ppll_ext.data import DATASET_NAMES
from ppll_ext.errors import ConfigError, DataError
from ppll_ext.models import MODEL_NAMES

REPO = Path(__file__).resolve().parents[1]

CHOICES = [
    ("model.name", MODEL_NAMES),
    ("data.name", DATASET_NAMES),
    ("local.aux", AUX_KINDS),
    ("local.runtime", RUNTIMES),
    ("local.engine", ENGINES),
    ("optim.name", OPTIMIZERS),
    ("optim.schedule", SCHEDULES),
    ("train.method", METHODS),
    ("train.device", DEVICES),
    ("train.autocast", tuple(AUTOCAST)),
    ("train.on_nan", ON_NAN),
]


def _hint(key: str) -> object:
    """The resolved type annotation of a dotted config key."""
    section, name = key.split(".")
    return get_type_hints(type(getattr(Config(), section)))[name]


# --- ownership -------------------------------------------------------------------------------------------------------


def test_model_and_data_config_live_with_their_owners_and_are_re_exported() -> None:
    from ppll_ext.data import DataConfig as data_owned
    from ppll_ext.data.datasets import DataConfig as datasets_owned
    from ppll_ext.models import ModelConfig as models_owned

    assert ModelConfig is models_owned and ModelConfig.__module__ == "ppll_ext.models"
    assert DataConfig is data_owned is datasets_owned and DataConfig.__module__ == "ppll_ext.data.datasets"
    assert config_module.ModelConfig is ModelConfig and config_module.DataConfig is DataConfig
    # the per-field docstrings came along
    assert '"""ResNet: channels of the first group (the groups use width, 2*width, 4*width)."""' in inspect.getsource(
        ModelConfig)
    doc = '"""Use only the first N training images (after a seeded shuffle) or text blocks; None = all."""'
    assert doc in inspect.getsource(DataConfig)


def _imported_modules(path: Path) -> set[str]:
    """Every module an import statement of `path` names (top level and inside functions)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


@pytest.mark.parametrize("package", ["models", "data"])
def test_models_and_data_never_import_the_config(package: str) -> None:
    for path in sorted((REPO / "ppll_ext" / package).glob("*.py")):
        assert "ppll_ext.config" not in _imported_modules(path), path


def test_owners_import_without_the_config_module() -> None:
    code = ("import sys, ppll_ext.models, ppll_ext.data; "
            "assert 'ppll_ext.config' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ppll_ext'))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


# --- Literal choice fields -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, allowed", CHOICES, ids=[k for k, _ in CHOICES])
def test_choice_fields_are_literals_of_the_owners_constants(key: str, allowed: tuple[str, ...]) -> None:
    hint = _hint(key)
    assert get_origin(hint) is Literal and get_args(hint) == tuple(allowed)
    section, name = key.split(".")
    assert getattr(getattr(Config(), section), name) in allowed  # the default is allowed


def test_constants() -> None:
    assert OPTIMIZERS == ("sgd", "adam", "adamw") and SCHEDULES == ("cosine", "constant")
    assert RUNTIMES == ("sequential", "threads", "processes") and ENGINES == ("native", "deepspeed", "torch")
    assert DEVICES == ("cpu", "cuda")
    assert METHODS == ("local", "bp") and AUTOCAST_MODES == tuple(AUTOCAST)


@pytest.mark.parametrize("key, allowed", CHOICES, ids=[k for k, _ in CHOICES])
def test_a_value_outside_a_literal_is_rejected_with_its_key(key: str, allowed: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{key}=maybe"])
    assert str(info.value) == f"{key}='maybe' is not one of {', '.join(allowed)}"
    assert info.value.key == key


@pytest.mark.parametrize("key, allowed", CHOICES, ids=[k for k, _ in CHOICES])
def test_every_allowed_value_is_accepted(key: str, allowed: tuple[str, ...],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # train.device=cuda on any machine
    section, name = key.split(".")
    for value in allowed:
        overrides = [f"{key}={value}"]
        if value in ("imagefolder", "cifar10", "svhn", "stl10"):
            overrides.append("data.root=/somewhere")  # a data root is only needed when loading
        if value in ("gpt2", "llama", "pydoc", "text", "tokens", "hf_disk", "lm", "lm-blocks"):
            # language models, text and per-token heads belong together
            overrides += [f"model.name={value if value in ('gpt2', 'llama') else 'gpt2'}",
                          f"data.name={value if key == 'data.name' else 'pydoc'}"]
        assert getattr(getattr(load_config(None, overrides), section), name) == value


def test_literal_rejects_a_non_string_and_the_message_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^train.autocast=16 is not one of none, bf16, fp16$") as info:
        load_config(None, ["train.autocast=16"])
    assert info.value.key == "train.autocast"


def test_literal_in_a_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("optim: {name: rmsprop}\n")
    with pytest.raises(ConfigError, match=r"optim.name='rmsprop' is not one of sgd, adam, adamw") as info:
        load_config(path)
    assert info.value.key == "optim.name"
    path.write_text("optim: {name: adamw, schedule: constant}\nlocal: {aux: mlp-sr}\n")
    cfg = load_config(path)
    assert (cfg.optim.name, cfg.optim.schedule, cfg.local.aux) == ("adamw", "constant", "mlp-sr")


# --- per-section checks ----------------------------------------------------------------------------------------------

SECTION_CASES = [
    (ModelConfig(name="foo"), "model.name", "model.name='foo' is not one of resnet8, resnet20"),
    (ModelConfig(width=0), "model.width", "model.width=0 must be at least 1"),
    (ModelConfig(dropout=1.0), "model.dropout", "model.dropout=1.0 must be in [0, 1)"),
    (DataConfig(name="mnist"), "data.name", "data.name='mnist' is not one of digits, cifar10"),
    (DataConfig(train_subset=0), "data.train_subset", "data.train_subset=0 must be at least 1 (or null"),
    (DataConfig(test_subset=-1), "data.test_subset", "data.test_subset=-1 must be at least 1"),
    (LocalConfig(stages=0), "local.stages", "local.stages=0 must be at least 1"),
    (LocalConfig(micro_batches=0), "local.micro_batches", "local.micro_batches=0 must be at least 1"),
    (LocalConfig(queue_depth=0), "local.queue_depth", "local.queue_depth=0 must be at least 1"),
    (LocalConfig(data_parallel=0), "local.data_parallel", "local.data_parallel=0 must be at least 1"),
    (LocalConfig(aux="magic"), "local.aux", "local.aux='magic' is not one of"),
    (LocalConfig(runtime="gpus"), "local.runtime", "local.runtime='gpus' is not one of sequential, threads, processes"),
    (LocalConfig(engine="megatron"), "local.engine", "local.engine='megatron' is not one of native, deepspeed"),
    (LocalConfig(timeout_s=0.0), "local.timeout_s", "local.timeout_s=0.0 must be positive"),
    (OptimConfig(name="lion"), "optim.name", "optim.name='lion' is not one of sgd, adam, adamw"),
    (OptimConfig(schedule="step"), "optim.schedule", "optim.schedule='step' is not one of cosine, constant"),
    (OptimConfig(lr=-0.1), "optim.lr", "optim.lr=-0.1 must be at least 0"),
    (OptimConfig(warmup_steps=-1), "optim.warmup_steps", "optim.warmup_steps=-1 must be at least 0"),
    (OptimConfig(grad_clip=0.0), "optim.grad_clip", "optim.grad_clip=0.0 must be positive"),
    (OptimConfig(momentum=-0.5), "optim.momentum", "optim.momentum=-0.5 must be at least 0"),
    (OptimConfig(lr=math.nan), "optim.lr", "optim.lr=nan is not a finite number; set a number such as 0.1"),
    (OptimConfig(grad_clip=math.inf), "optim.grad_clip", "optim.grad_clip=inf is not a finite number; set null"),
    (LocalConfig(timeout_s=math.inf), "local.timeout_s", "local.timeout_s=inf is not a finite number"),
    (TrainConfig(threads=-1), "train.threads", "train.threads=-1 must be at least 0"),
    (TrainConfig(device="gpu"), "train.device", "train.device='gpu' is not one of cpu, cuda"),
    (TrainConfig(method="dp"), "train.method", "train.method='dp' is not one of local, bp"),
    (TrainConfig(autocast="fp8"), "train.autocast", "train.autocast='fp8' is not one of none, bf16, fp16"),
    (TrainConfig(on_nan="maybe"), "train.on_nan", "train.on_nan='maybe' is not one of error, skip"),
    (TrainConfig(epochs=0), "train.epochs", "train.epochs=0 must be at least 1"),
    (TrainConfig(batch_size=0), "train.batch_size", "train.batch_size=0 must be at least 1"),
    (TrainConfig(eval_batch_size=0), "train.eval_batch_size", "train.eval_batch_size=0 must be at least 1"),
    (TrainConfig(save_every=-1), "train.save_every", "train.save_every=-1 must be >= 0 and train.keep=2 >= 1"),
    (TrainConfig(keep=0), "train.keep", "train.save_every=0 must be >= 0 and train.keep=0 >= 1"),
    (TrainConfig(save_every=5), "train.save_dir", "train.save_every needs a run directory: set train.save_dir"),
    (TrainConfig(stop_at_step=-1), "train.stop_at_step", "train.stop_at_step=-1 must be at least 0"),
]


@pytest.mark.parametrize("section, key, message", SECTION_CASES, ids=[c[1] + "-" + str(i)
                                                                      for i, c in enumerate(SECTION_CASES)])
def test_each_section_checks_itself_and_the_whole_config_too(section: object, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        section.check()  # type: ignore[attr-defined]
    assert str(info.value).startswith(message) and info.value.key == key
    assert not isinstance(info.value, DataError)
    cfg = Config()
    setattr(cfg, key.split(".")[0], section)
    for check in (cfg.check, lambda: validate(cfg)):
        with pytest.raises(ConfigError) as info:
            check()
        assert str(info.value).startswith(message) and info.value.key == key


def test_defaults_and_good_sections_pass() -> None:
    Config().check()
    for section in (ModelConfig(name="vit"), DataConfig(train_subset=1), LocalConfig(stages=1), OptimConfig(lr=0.0),
                    TrainConfig(save_every=3, save_dir="run", stop_at_step=0)):
        section.check()


def test_cross_section_batch_size_must_divide_into_micro_batches() -> None:
    cfg = Config()
    cfg.train.batch_size, cfg.local.micro_batches = 10, 3
    with pytest.raises(ConfigError, match="train.batch_size=10 is not divisible by local.micro_batches=3") as info:
        cfg.check()
    assert info.value.key == "train.batch_size"
    cfg.train.batch_size = 9
    cfg.check()


def test_load_config_runs_the_checks() -> None:
    with pytest.raises(ConfigError, match="local.stages=0 must be at least 1") as info:
        load_config(None, ["local.stages=0"])
    assert info.value.key == "local.stages"


# --- key= on the other errors of config.py ---------------------------------------------------------------------------


@pytest.mark.parametrize("override, key, needle", [
    ("train.epoch=3", "train.epoch", "did you mean train.epochs"),
    ("trainer.epochs=3", "trainer", "unknown config key 'trainer'"),
    ("train=3", "train", "train: expected a mapping of keys"),
    ("train.epochs=many", "train.epochs", "train.epochs: expected an integer"),
    ("train.progress=3", "train.progress", "train.progress: expected true or false"),
    ("optim.lr=fast", "optim.lr", "optim.lr: expected a number"),
    ("train.save_dir={a: 1}", "train.save_dir", "train.save_dir: expected a string"),
    ("train.epochs", "train.epochs", "expected key=value"),
    ("train.epochs=[", "train.epochs", "value is not valid YAML"),
])
def test_config_errors_carry_the_key(override: str, key: str, needle: str | None) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert info.value.key == key
    assert needle is None or needle in str(info.value)


def test_config_file_errors_name_the_path_argument(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n")
    for path in (tmp_path / "missing.yaml", bad):
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert info.value.key == "path"


def _alias_bomb(levels: int) -> str:
    """A YAML flow list of nested aliases: each level is nine aliases of the one before, so the text grows by a few
    characters per level and what it expands to ninefold (7 levels: 9**7 scalars from 330 characters)."""
    names = "abcdefghij"
    items = ["&a [" + ", ".join(["lol"] * 9) + "]"]
    items += [f"&{names[i]} [" + ", ".join([f"*{names[i - 1]}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


def test_a_yaml_alias_bomb_is_refused_at_once_in_one_short_line(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Nested aliases in a config file or a --set value are refused before they expand (a 330-byte file used to
    make a 39 MB error line after seconds; nine levels a 3 GB one), as is an alias inside what it names; aliases that
    stay small still work."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"optim: {{lr: {_alias_bomb(7)}}}\n")
    assert len(bomb.read_bytes()) < 400
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_config(bomb)
    assert time.perf_counter() - start < 0.5
    assert str(info.value) == (f"config file {str(bomb)!r} holds more than 1,000,000 characters once its YAML "
                               f"aliases (*name) are expanded; a config needs a few kilobytes: write it without nested "
                               f"aliases")
    assert info.value.key == "path"

    start = time.perf_counter()
    rc, err = _cli(capsys, "--set", f"optim.lr={_alias_bomb(7)}")
    assert time.perf_counter() - start < 0.5
    assert rc == 2 and len(err) == 1 and len(err[0]) < 500, (rc, len(err), len(err[0]))
    assert err[0].startswith("ppll: error: --set 'optim.lr=[&a [lol, lol, lol,") and \
        err[0].endswith("holds more than 1,000,000 characters once its YAML aliases (*name) are expanded; a config "
                        "needs a few kilobytes: write it without nested aliases (command line: --set optim.lr=...)")

    loop = tmp_path / "loop.yaml"
    loop.write_text("train: {save_dir: &a [*a]}\n")
    with pytest.raises(ConfigError, match=r"loop.yaml' has a YAML alias inside the node it names \(&name ... \*name\), "
                                          r"which never ends; write the value out$"):
        load_config(loop)
    fine = tmp_path / "fine.yaml"
    fine.write_text("train: {save_dir: &dir runs/a, log_dir: *dir, epochs: &n 3}\nlocal: {stages: *n}\n")
    cfg = load_config(fine)
    assert (cfg.train.save_dir, cfg.train.log_dir, cfg.train.epochs, cfg.local.stages) == ("runs/a", "runs/a", 3, 3)


LONG = 100_000


@pytest.mark.parametrize("make", [
    lambda: load_config(None, ["train.on_nan=" + "x" * LONG]),  # not one of the choices
    lambda: load_config(None, ["model.name=" + "x" * LONG]),
    lambda: load_config(None, ["optim.lr=" + "x" * LONG]),  # not a number
    lambda: load_config(None, ["train.epochs=" + "x" * LONG]),  # not an integer
    lambda: load_config(None, ["train.epochs=[" + "1, " * 2000 + "1]"]),
    lambda: load_config(None, ["train.progress=" + "x" * LONG]),  # not true or false
    lambda: load_config(None, ["train.save_dir={a: " + "x" * LONG + "}"]),  # not a string
    lambda: load_config(None, ["optim=" + "x" * LONG]),  # not a mapping
    lambda: load_config(None, ["train." + "x" * LONG + "=1"]),  # an unknown key
    lambda: load_config(None, ["x" * LONG]),  # no '='
    lambda: load_config(None, ["train.save_every=-" + "9" * 4000]),  # a check of the section
    lambda: load_config(None, ["train.batch_size=" + "9" * 4000, "local.micro_batches=7"]),  # a check across sections
    lambda: load_config(None, ["train.epochs=" + "9" * 5000]),  # more digits than Python converts
    lambda: load_config(None, ["train.save_dir=" + "- " * 1000 + "x"]),  # deeper than the YAML reader goes
    lambda: load_config(Path("x" * LONG)),  # a path the file system refuses
    lambda: DataConfig(name="x" * LONG).check(),  # sections built in Python
    lambda: DataConfig(train_subset=-10 ** 3000).check(),
    lambda: ModelConfig(name="x" * LONG).check(),
])
def test_error_messages_quote_at_most_200_characters_of_a_value(make: Callable[[], object]) -> None:
    """Every message that shows a value someone gave shows at most about 200 characters of it, in one line, and a
    value YAML or Python cannot read is a ConfigError too (not a ValueError or RecursionError traceback)."""
    with pytest.raises(ConfigError) as info:
        make()
    message = str(info.value)
    assert "\n" not in message and len(message) < 1000, (len(message), message[:300])
    assert not any(run in message for run in ("x" * 201, "9" * 201, "1, " * 67)), message[:300]


FLOAT_KEYS = [k for k in config_keys() if float in (_hint(k), *get_args(_hint(k)))]


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan", "-Infinity", "1e400"])
def test_every_float_key_refuses_nan_and_infinity(key: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{key}={value}"])
    message = str(info.value)
    assert info.value.key == key and message.startswith(f"{key}=") and "\n" not in message
    assert any(word in message for word in ("nan", "inf")), message


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("text, number", [("1e-3", 1e-3), ("5E-4", 5e-4), ("1e-1", 0.1)])
def test_float_keys_take_exponent_notation(key: str, text: str, number: float) -> None:
    """YAML 1.1 reads 1e-3 (no dot) as a string; a float key takes it as the number it spells."""
    section, name = key.split(".")
    assert getattr(getattr(load_config(None, [f"{key}={text}"]), section), name) == number


def test_exponent_notation_in_a_yaml_file_and_strings_stay_strings(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("optim: {lr: 1e-3, weight_decay: 5e-4, grad_clip: 1e0}\ndata: {tokenizer: 1e-3}\n")
    cfg = load_config(path)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.grad_clip) == (1e-3, 5e-4, 1.0)
    assert cfg.data.tokenizer == "1e-3"  # a str field keeps the text
    with pytest.raises(ConfigError, match=r"^optim.lr: expected a number such as 0.1 or 1e-3, got 'fast'$"):
        load_config(None, ["optim.lr=fast"])


def test_cuda_without_a_cuda_device_is_refused_before_any_work(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A GPU config still loads anywhere (to read, build on the meta device, inspect); a run refuses it up front."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_config(None, ["train.device=cuda"])
    with pytest.raises(ConfigError, match=r"^train.device=cuda but no CUDA device is available .*; use "
                                          r"train.device=cpu$") as info:
        check_device(cfg)
    assert info.value.key == "train.device"
    for runtime in ("sequential", "processes"):  # the processes runtime: in the parent, before it spawns torchrun
        assert main(["train", "--runtime", runtime, "--set", "train.device=cuda"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ppll: error: train.device=cuda but no CUDA device"), lines
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_device(load_config(None, ["train.device=cuda"]))


def test_config_file_that_is_not_utf8_a_directory_or_has_odd_keys(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"optim:\n  name: \xe9t\xe9\n")
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 0xe9 at offset 15, line 2\); save it as "
                                          r"UTF-8$") as info:
        load_config(bad)
    assert info.value.key == "path"
    (tmp_path / "bom.yaml").write_bytes(b"\xef\xbb\xbfoptim: {lr: 0.5}\n")  # a UTF-8 byte-order mark is fine
    assert load_config(tmp_path / "bom.yaml").optim.lr == 0.5
    (tmp_path / "bom.yml").write_bytes(b"\xef\xbb\xbf# \xe9\n")  # offsets count the mark's bytes too
    with pytest.raises(ConfigError, match=r"\(byte 0xe9 at offset 5, line 1\)"):
        load_config(tmp_path / "bom.yml")
    with pytest.raises(ConfigError, match=r"is a directory; pass a YAML file to --config, e.g. one of bom.yaml, "
                                          r"bom.yml, latin1.yaml$") as info:
        load_config(tmp_path)
    assert info.value.key == "path"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"is a directory; pass a YAML file to --config; .* holds no \*.yaml"):
        load_config(tmp_path / "empty")
    (tmp_path / "intkey.yaml").write_text("optim: {1: 2}\n")
    with pytest.raises(ConfigError, match=r"^unknown config key 'optim.1'; valid keys: optim.name") as info:
        load_config(tmp_path / "intkey.yaml")
    assert info.value.key == "optim.1"


def test_cli_bad_numbers_and_files_are_one_line(tmp_path: Path) -> None:
    """The real `ppll train` (a subprocess each): exit code 2, one `ppll: error:` line naming the key, no traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"optim: {lr: 0.1}\n# caf\xe9\n")
    cases = [
        (["--set", "optim.lr=.nan"], "optim.lr=nan is not a finite number"),
        (["--config", str(bad)], "is not UTF-8 text (byte 0xe9"),
    ]  # the other bad values take the same road to stderr (in-process tests above)
    for args, needle in cases:
        res = subprocess.run([sys.executable, "-m", "ppll_ext", "train", *args], cwd=REPO, capture_output=True,
                             text=True, timeout=120)
        err = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(err) == 1 and err[0].startswith("ppll: error: "), res.stderr
        assert needle in err[0] and "Traceback" not in res.stderr + res.stdout, res.stderr


def test_parse_override_and_config_keys() -> None:
    assert parse_override("train.on_nan=skip") == {"train": {"on_nan": "skip"}}
    keys = config_keys()
    assert "train.on_nan" in keys and "model.name" in keys and "data.train_subset" in keys
    assert len(keys) == sum(len(dataclasses.fields(getattr(Config(), s.name))) for s in dataclasses.fields(Config))
    assert set(FLAGS) <= set(keys)


# --- the CLI's flag hints --------------------------------------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    """`ppll train ...` in this process: exit code and stderr lines."""
    rc = main(["train", *args])
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.fixture(autouse=True)
def _first_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """Errors are printed on rank 0 only, and no launcher settings leak in."""
    for name in ("RANK", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)


def test_cli_names_the_flag_of_a_bad_setting(capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _cli(capsys, "--set", "train.on_nan=maybe")
    assert rc == 2 and err == ["ppll: error: train.on_nan='maybe' is not one of error, skip "
                               "(command line: --on-nan or --set train.on_nan=...)"]


@pytest.mark.parametrize("args, suffix", [
    (["--set", "local.runtime=gpus"], " (command line: --runtime or --set local.runtime=...)"),
    (["--set", "local.engine=megatron"], " (command line: --engine or --set local.engine=...)"),
    (["--keep", "0"], " (command line: --keep or --set train.keep=...)"),
    (["--save-every", "-1"], " (command line: --save-every or --set train.save_every=...)"),
    (["--save-every", "5"], " (command line: --save-dir or --set train.save_dir=...)"),
    (["--engine", "deepspeed", "--runtime", "threads"], " (command line: --runtime or --set local.runtime=...)"),
    (["--set", "model.name=resnet9000"], " (command line: --set model.name=...)"),
    (["--set", "train.epochs=0"], " (command line: --set train.epochs=...)"),
    (["--set", "train.batch_size=10", "--set", "local.micro_batches=3"],
     " (command line: --set train.batch_size=...)"),
])
def test_cli_hint_is_one_line(args: list[str], suffix: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _cli(capsys, *args)
    assert rc == 2 and len(err) == 1 and err[0].startswith("ppll: error: ") and err[0].endswith(suffix), err
    assert err[0].count("(command line:") == 1


@pytest.mark.parametrize("args", [
    ["--set", "train.epoch=3"],  # an unknown key: nothing to set
    ["--set", "train.epochs"],  # the message already shows --set
    ["--config", "/nonexistent.yaml"],  # the `path` argument: the message already names --config
])
def test_cli_adds_no_hint_where_there_is_none(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _cli(capsys, *args)
    assert rc == 2 and len(err) == 1 and err[0].startswith("ppll: error: ") and "(command line:" not in err[0], err


def test_flag_hint_maps_python_arguments_and_config_keys() -> None:
    assert flag_hint(ConfigError("on_nan='x' is not one of error, skip", key="on_nan")) == \
        " (command line: --on-nan or --set train.on_nan=...)"
    assert flag_hint(ConfigError("bad", key="save_dir")) == " (command line: --save-dir or --set train.save_dir=...)"
    assert flag_hint(ConfigError("bad", key="runtime")) == " (command line: --runtime or --set local.runtime=...)"
    assert flag_hint(ConfigError("bad", key="trace")) == " (command line: --trace or --set train.trace=...)"
    assert flag_hint(ConfigError("bad", key="optim.lr")) == " (command line: --set optim.lr=...)"
    assert flag_hint(ConfigError("bad", key="batch_size")) == ""  # a Python argument without a flag
    assert flag_hint(ConfigError("bad", key="path")) == ""
    assert flag_hint(ConfigError("bad", key="train.nope")) == ""  # not a config key
    assert flag_hint(ConfigError("bad")) == ""
    assert flag_hint(ConfigError("skip it with --on-nan skip", key="on_nan")) == ""  # already said
    assert flag_hint(DataError("bad", key="data.root")) == " (command line: --set data.root=...)"
