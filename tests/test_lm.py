"""Language models end to end: config checks, a trained run's checkpoints load with transformers' from_pretrained and
give ppll's own evaluation, export, model.hf_config / model.pretrained, and `ppll generate` (also early exit)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ppll_ext.cli import main
from ppll_ext.config import load_config
from ppll_ext.core import NextTokenLoss
from ppll_ext.data import BatchLoader, load_dataset
from ppll_ext.errors import ConfigError
from ppll_ext.train import run_training

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.depth=2", "model.hidden_dim=32", "model.heads=2", "model.mlp_dim=64", "data.name=pydoc",
        "data.seq_len=32", "data.train_subset=128", "data.test_subset=16", "train.batch_size=16",
        "train.eval_batch_size=8", "train.epochs=1", "train.progress=false", "optim.name=adamw", "optim.lr=0.01",
        "optim.schedule=constant", "local.partition=uniform"]


def _run(overrides: list[str], out: io.StringIO | None = None) -> tuple[object, dict]:
    """Train in this process; the summary and the trained blocks."""
    cfg = load_config(None, overrides)
    got: dict = {}
    summary = run_training(cfg, out=out or io.StringIO(), on_finish=got.update)
    return summary, got


def _val_loss(model: torch.nn.Module, overrides: list[str]) -> float:
    """Mean next-token loss per token of `model` (a transformers CausalLM) over the validation split."""
    cfg = load_config(None, overrides)
    loader = BatchLoader(load_dataset(cfg.data, "test"), cfg.train.eval_batch_size, shuffle=False, augment=False)
    loss, total = NextTokenLoss(), 0.0
    count = 0
    with torch.no_grad():
        for x, y in loader:
            s = loss.score(model(x).logits, y)
            total, count = total + s.loss_sum, count + s.loss_count
    return total / count


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], object]:
    """A K = 2 GPT-2 run (sequential runtime) saved to a run folder; its printed output in root/out.txt."""
    root = tmp_path_factory.mktemp("gpt2run")
    overrides = [*TINY, "model.name=gpt2", "local.stages=2", "local.runtime=sequential", "local.aux=lm",
                 f"train.save_dir={root}"]
    out = io.StringIO()
    summary, _ = _run(overrides, out)
    (root / "out.txt").write_text(out.getvalue())
    return root, overrides, summary


def test_lm_run_reports_perplexity_and_trains(gpt2_run: tuple[Path, list[str], object]) -> None:
    root, _, summary = gpt2_run
    assert summary.task == "lm" and len(summary.aux_loss) == 1
    # 8 steps from a uniform guess over 256 bytes (perplexity 256) must already be far better.
    assert math.exp(summary.loss) < 120 and math.exp(summary.aux_loss[0]) < 120
    # The benchmark reads these numbers back from the run's metrics.jsonl.
    from ppll_ext.bench.suite import lm_result
    from ppll_ext.train.metrics import read_metrics

    parsed = lm_result(read_metrics(root), tokens_per_sample=32)
    assert parsed["perplexity"] == pytest.approx(math.exp(summary.loss), abs=1e-3)
    assert parsed["aux_perplexity"] == [pytest.approx(math.exp(summary.aux_loss[0]), abs=0.01)]
    assert parsed["token_accuracy"] == pytest.approx(summary.accuracy, abs=1e-4)
    assert [e for e, _ in parsed["curve"]] == [1] and parsed["tokens_per_s"] > 0


def test_step_folder_loads_with_from_pretrained_and_matches_ppll_evaluation(
        gpt2_run: tuple[Path, list[str], object], tmp_path: Path) -> None:
    root, overrides, summary = gpt2_run
    step = root / "step-000008"
    config = json.loads((step / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["tie_word_embeddings"] is False
    model = AutoModelForCausalLM.from_pretrained(step).eval()
    assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)  # untied and trained apart
    assert _val_loss(model, overrides) == pytest.approx(summary.loss, rel=1e-5)
    # ppll export writes a folder from_pretrained loads to the same model.
    assert main(["export", str(root), str(tmp_path / "out")]) == 0  # the CLI's code, in this process
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = torch.randint(0, 256, (2, 32))
    assert torch.equal(exported(x).logits, model(x).logits)


def test_generate_whole_model_and_early_exit(gpt2_run: tuple[Path, list[str], object],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    root, _, _ = gpt2_run
    for extra in ([], ["--exit-stage", "0"]):
        assert main(["generate", str(root), "--prompt", "def ", "--max-new-tokens", "12", *extra]) == 0
        out, err = capsys.readouterr()
        assert out.startswith("def ") and len(out.encode()) >= 4 + 12 - 6  # invalid bytes decode to one character
        assert "tokens/s" in err and ("aux head" in err) == bool(extra)
    assert main(["generate", str(root), "--prompt", "x", "--exit-stage", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--exit-stage 1" in err and "omit --exit-stage" in err


def _bpe_folder(folder: Path) -> Path:
    """A small byte-level BPE tokenizer trained on pydoc text, saved with save_pretrained."""
    import pydoc_data.topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(pydoc_data.topics.topics.values())[:5], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(str(folder))
    return folder


def test_llama_with_a_local_tokenizer_and_lm_blocks_heads(tmp_path: Path) -> None:
    tok = _bpe_folder(tmp_path / "tok")
    overrides = [*TINY, "model.name=llama", "model.kv_heads=1", "model.depth=3", "local.stages=2",
                 "local.runtime=threads", "local.aux=lm-blocks", f"data.tokenizer={tok}",
                 f"train.save_dir={tmp_path / 'run'}"]
    summary, blocks = _run(overrides)
    assert math.exp(summary.loss) < 400
    step = next((tmp_path / "run").glob("step-*"))
    assert AutoTokenizer.from_pretrained(step)("hello").input_ids == AutoTokenizer.from_pretrained(tok)(
        "hello").input_ids
    model = AutoModelForCausalLM.from_pretrained(step).eval()
    assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(tok))
    assert model.config.tie_word_embeddings is False
    assert _val_loss(model, overrides) == pytest.approx(summary.loss, rel=1e-5)
    # The lm-blocks head holds a fresh copy of the next stage's first decoder layer, then LayerNorm + unembedding.
    assert sum(type(m).__name__ == "LlamaDecoderLayer" for m in blocks[0].aux.modules()) == 1


def test_hf_config_and_pretrained_start_points(tmp_path: Path) -> None:
    from ppll_ext.build import build_layered

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "n_layer": 3, "n_embd": 48, "n_head": 3, "n_positions": 64, "vocab_size": 300}))
    cfg = load_config(None, ["model.name=gpt2", f"model.hf_config={tmp_path / 'cfg'}", "data.name=pydoc"])
    layered = build_layered(cfg, num_classes=256, seq_len=32)
    assert len(layered.layers) == 5 and layered.model.config.n_embd == 48
    layered.model.save_pretrained(tmp_path / "pre")
    again = build_layered(load_config(None, ["model.name=gpt2", f"model.pretrained={tmp_path / 'pre'}",
                                             "data.name=pydoc"]), num_classes=256, seq_len=32)
    for name, t in layered.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], t), name
    with pytest.raises(ConfigError, match="lower data.seq_len"):
        build_layered(cfg, num_classes=256, seq_len=65)
    with pytest.raises(ConfigError, match="model_type"):
        load_config(None, ["model.name=llama", f"model.hf_config={tmp_path / 'cfg'}", "data.name=pydoc"])
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(None, ["model.name=llama", f"model.pretrained={tmp_path}", "data.name=pydoc"])


@pytest.mark.parametrize(("overrides", "needle"), [
    (["model.name=gpt2"], "set data.name to a text source"),
    (["data.name=pydoc"], "set model.name to gpt2 or llama"),
    (["model.name=gpt2", "data.name=pydoc", "local.aux=conv"], "per-token heads"),
    (["model.name=gpt2", "data.name=pydoc", "train.task=classification"], "train.task"),
    (["model.name=resnet8", "model.pretrained=x"], "model.pretrained is for the Hugging Face"),
    (["model.name=gpt2", "data.name=pydoc", "data.seq_len=1"], "data.seq_len"),
])
def test_lm_config_errors_are_one_line(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("name", "low", "high"), [
    ("gpt2_small_k4", 150e6, 170e6), ("gpt2_medium_k8", 395e6, 420e6), ("llama_1b_k4", 1.0e9, 1.2e9),
    ("llama_1b_k8", 1.0e9, 1.2e9), ("gpt2_tiny_text", 0.7e6, 1.2e6)])
def test_shipped_lm_configs_build_the_sizes_they_name(name: str, low: float, high: float) -> None:
    """GPT-2 small / medium (124M / 355M with tied embeddings; untied adds the unembedding) and a 1.1B Llama, built
    on the meta device from the configs' sizes with their tokenizers' vocabularies, cut into K >= 4 stages."""
    from ppll_ext.core.partition import check_stages
    from ppll_ext.models import build_model

    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    vocab = {"gpt2": 50257, "llama": 32000}[cfg.model.name] if cfg.data.name == "tokens" else 256
    with torch.device("meta"):
        layered = build_model(cfg.model, num_classes=vocab, seq_len=cfg.data.seq_len)
    params = sum(p.numel() for p in layered.model.parameters())
    assert low < params < high, params
    check_stages(len(layered.layers), cfg.local.stages)
    assert cfg.task == "lm" and cfg.local.aux == "lm"


def test_text_batches_are_deterministic_and_resume_mid_epoch() -> None:
    """Token blocks go through the images' loader: the same (seed, epoch) order, and iter_from(k) yields exactly
    batches k, k+1, ... of a full pass (what resuming from a checkpoint relies on)."""
    cfg = load_config(None, ["model.name=gpt2", "data.name=pydoc", "data.seq_len=64"])
    ds = load_dataset(cfg.data, "train")
    loader = BatchLoader(ds, 16, shuffle=True, augment=True, seed=3)
    loader.set_epoch(2)
    full = list(loader)
    assert len(full) == len(loader) == math.ceil(len(ds) / 16)
    resumed = list(loader.iter_from(5))
    assert len(resumed) == len(full) - 5
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(resumed, full[5:], strict=True))
    x, y = full[0]
    assert x.dtype == y.dtype == torch.int64 and x.shape == (16, 64) and torch.equal(x, y)
    loader.set_epoch(3)
    assert not torch.equal(next(iter(loader))[0], x)
