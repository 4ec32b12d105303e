"""Hugging Face decoder LMs (GPT-2, Llama) as ordered layer lists that keep the Hugging Face parameter names.

The layers are the model's own modules (embeddings, each decoder block, final norm + lm_head)
behind thin wrappers that add what the model's forward adds around them (positions, rotary embeddings, the
causal mask through SDPA's is_causal), so `nn.Sequential(*layers)` computes the model's logits.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ppll_ext.errors import ConfigError, PPLLError, quote
from ppll_ext.folders import refuse_code
from ppll_ext.models.layered import LayeredModel

if TYPE_CHECKING:
    from transformers import PretrainedConfig

LM_MODELS: tuple[str, ...] = ("gpt2", "llama")
"""model.name values that build a Hugging Face causal language model."""


class HFLayer(nn.Module):
    """A layer of a cut Hugging Face model; `hf_names` maps its child modules to their paths in the model."""

    hf_names: dict[str, str]

    def hf_state_names(self) -> dict[str, str]:
        """This layer's state_dict keys -> the Hugging Face model's keys."""
        out = {}
        for key in self.state_dict():
            child, _, rest = key.partition(".")
            out[key] = f"{self.hf_names[child]}.{rest}"
        return out


class GPT2Embeddings(HFLayer):
    """Token + learned position embeddings, then dropout (GPT2Model's input side)."""

    def __init__(self, wte: nn.Embedding, wpe: nn.Embedding, drop: nn.Dropout) -> None:
        super().__init__()
        self.wte, self.wpe, self.drop = wte, wpe, drop
        self.hf_names = {"wte": "transformer.wte", "wpe": "transformer.wpe"}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.drop(self.wte(ids) + self.wpe(pos))


class GPT2Layer(HFLayer):
    """One GPT2Block, causal through SDPA (no mask tensor needed without padding)."""

    def __init__(self, block: nn.Module, index: int) -> None:
        super().__init__()
        self.block = block
        self.hf_names = {"block": f"transformer.h.{index}"}

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block(h)


class LlamaEmbeddings(HFLayer):
    """Token embeddings (Llama has no learned positions: rotary embeddings live in each layer)."""

    def __init__(self, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        self.hf_names = {"embed_tokens": "model.embed_tokens"}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)


class LlamaLayer(HFLayer):
    """One LlamaDecoderLayer with its own copy of the rotary embedding (it has no trained parameters)."""

    def __init__(self, layer: nn.Module, rotary: nn.Module, index: int) -> None:
        super().__init__()
        self.layer = layer
        self.rotary = copy.deepcopy(rotary)
        self.hf_names = {"layer": f"model.layers.{index}", "rotary": "model.rotary_emb"}

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        return self.layer(h, position_ids=pos, position_embeddings=self.rotary(h, pos))


class LMOutput(HFLayer):
    """Final norm and lm_head: (N, T, D) -> (N, T, vocab)."""

    def __init__(self, norm: nn.Module, lm_head: nn.Linear, norm_name: str) -> None:
        super().__init__()
        self.norm, self.lm_head = norm, lm_head
        self.hf_names = {"norm": norm_name, "lm_head": "lm_head"}

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))


def untie(model: nn.Module) -> None:
    """Give lm_head its own copy of the input embedding: under local learning the first and last stages train
    them on different losses. Records tie_word_embeddings=False so from_pretrained rebuilds the same model."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is embed.weight:
        head.weight = nn.Parameter(embed.weight.detach().clone())
    model.config.tie_word_embeddings = False


def hf_layers(model: nn.Module) -> list[HFLayer]:
    """The ordered layers of a GPT2LMHeadModel or LlamaForCausalLM (sharing its modules), tied embeddings untied."""
    if model.config._attn_implementation != "sdpa":
        raise ConfigError(f"attn_implementation={model.config._attn_implementation!r}: the layers rely on SDPA's "
                          f"causal attention; load the model with attn_implementation='sdpa'")
    untie(model)
    kind = model.config.model_type
    if kind == "gpt2":
        t = model.transformer
        return [GPT2Embeddings(t.wte, t.wpe, t.drop), *(GPT2Layer(b, i) for i, b in enumerate(t.h)),
                LMOutput(t.ln_f, model.lm_head, "transformer.ln_f")]
    if kind == "llama":
        m = model.model
        return [LlamaEmbeddings(m.embed_tokens), *(LlamaLayer(b, m.rotary_emb, i) for i, b in enumerate(m.layers)),
                LMOutput(m.norm, model.lm_head, "model.norm")]
    raise ConfigError(f"model_type {kind!r} is not supported; use gpt2 or llama")


def hf_config(kind: str, *, vocab_size: int, max_positions: int, depth: int, hidden_dim: int, heads: int,
              kv_heads: int | None, mlp_dim: int, dropout: float) -> PretrainedConfig:
    """A GPT2Config or LlamaConfig of the given sizes (no download), with SDPA attention and untied embeddings."""
    from transformers import GPT2Config, LlamaConfig

    if hidden_dim % heads:
        raise ConfigError(f"model.hidden_dim={hidden_dim} is not divisible by model.heads={heads}; choose a width "
                          f"that is a multiple of the head count", key="model.hidden_dim")
    if kind == "gpt2":
        if kv_heads not in (None, heads):
            raise ConfigError("model.kv_heads (grouped-query attention) is a Llama option; GPT-2 uses model.heads",
                              key="model.kv_heads")
        config = GPT2Config(vocab_size=vocab_size, n_positions=max_positions, n_embd=hidden_dim, n_layer=depth,
                            n_head=heads, n_inner=mlp_dim, resid_pdrop=dropout, embd_pdrop=dropout,
                            attn_pdrop=dropout, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
    elif kind == "llama":
        kv = kv_heads or heads
        if heads % kv:
            raise ConfigError(f"model.heads={heads} is not a multiple of model.kv_heads={kv}", key="model.kv_heads")
        config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=max_positions, hidden_size=hidden_dim,
                             num_hidden_layers=depth, num_attention_heads=heads, num_key_value_heads=kv,
                             intermediate_size=mlp_dim, attention_dropout=dropout, bos_token_id=None,
                             eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    else:
        raise ConfigError(f"model.name={kind!r} is not a language model (gpt2, llama)", key="model.name")
    config._attn_implementation = "sdpa"
    return config


def read_hf_config(path: str | Path, kind: str) -> PretrainedConfig:
    """The config.json at `path` (a file, or a folder holding one) for model.hf_config; its model_type must be
    `kind` (model.name), and it may not ask for code of its own (auto_map)."""
    p = Path(path).expanduser()
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        raise ConfigError(f"model.hf_config={str(path)!r}: no config.json there; give a Hugging Face config.json or "
                          f"the folder holding it", key="model.hf_config")
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"model.hf_config={str(path)!r}: {str(file)!r} is not valid JSON",
                          key="model.hf_config") from None
    return config_from_values(values, f"model.hf_config={str(path)!r}", kind, ConfigError, key="model.hf_config")


def config_from_values(values: object, where: str, kind: str | None, error: type[PPLLError],
                       key: str | None = None) -> PretrainedConfig:
    """A transformers config of a GPT-2 / Llama model from the values of its config.json (`where` names them in
    errors): never one that asks for code of its own (auto_map) or of another model type (`kind`, or any of
    LM_MODELS when None). Built with AutoConfig.for_model, so transformers reads no file and runs no code."""
    from transformers import AutoConfig

    if not isinstance(values, dict):
        raise error(f"{where}: config.json is not a JSON object; restore it from a copy", key=key)
    values = dict(values)
    if "auto_map" in values:
        raise error(f"{where}: config.json has 'auto_map', which asks to run Python code shipped with the folder; "
                    f"ppll_ext never runs such code (trust_remote_code=False): use a gpt2 or llama config", key=key)
    model_type = values.pop("model_type", None)
    if model_type not in ((kind,) if kind else LM_MODELS):
        raise error(f"{where} is a {quote(model_type)} config but "
                    + (f"model.name={kind!r}; set model.name to its model_type (gpt2 or llama)" if kind
                       else "ppll_ext loads only gpt2 or llama models (no custom code is run)"),
                    key="model.name" if kind else key)
    for name in ("architectures", "transformers_version", "dtype", "torch_dtype"):
        values.pop(name, None)
    try:
        config = AutoConfig.for_model(model_type, **values)
    except (TypeError, ValueError) as exc:
        raise error(f"{where}: config.json does not describe a {model_type} model ({exc})", key=key) from None
    config._attn_implementation = "sdpa"
    return config


def check_pretrained(path: str | Path, kind: str) -> None:
    """ConfigError unless `path` is a local save_pretrained folder of a `kind` model (model.pretrained) that asks
    for no code of its own."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.pretrained={str(path)!r} has no config.json; give a local folder saved with "
                          f"save_pretrained (nothing is downloaded)", key="model.pretrained")
    refuse_code(folder, ("config.json",), f"model.pretrained={str(path)!r}", ConfigError, key="model.pretrained")
    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        model_type = None
    if model_type != kind:
        raise ConfigError(f"model.pretrained={str(path)!r} holds a {model_type!r} model but model.name={kind!r}; set "
                          f"model.name to its model_type (gpt2 or llama)", key="model.name")


def max_positions(config: PretrainedConfig) -> int:
    """The longest sequence the model's position embeddings cover."""
    return int(getattr(config, "n_positions", None) or config.max_position_embeddings)


def hf_layered(config: PretrainedConfig | None = None, pretrained: str | Path | None = None) -> LayeredModel:
    """A GPT-2 or Llama causal LM built from `config` (weights initialised from torch's current seed), or loaded
    with from_pretrained from the local folder `pretrained`, cut into layers keeping the Hugging Face names."""
    from transformers import AutoModelForCausalLM

    if pretrained is not None:
        folder = Path(pretrained).expanduser()
        refuse_code(folder, ("config.json",), f"model.pretrained={str(pretrained)!r}", ConfigError,
                    allowed_types=LM_MODELS, key="model.pretrained")
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, trust_remote_code=False,
                                                     attn_implementation="sdpa", dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.float().train()
    return LayeredModel(model, list(hf_layers(model)), model.config.model_type)
