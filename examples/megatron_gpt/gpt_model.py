"""GPT-2 layers in Megatron-DeepSpeed's pipeline form and its data path, shared by pretrain_gpt_stock.py and
pretrain_gpt_ppll.py: EmbeddingPipe (word + position embeddings), ParallelTransformerLayerPipe (Megatron's module
names: input_layernorm, self_attention.query_key_value / dense, post_attention_layernorm, mlp.dense_h_to_4h /
dense_4h_to_h), LMHeadPipe (the untied output layer), the CrossEntropy loss, a byte-level GPT dataset over Python's
bundled reference documentation (nothing to download), get_batch_pipe and cyclic_iter.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pydoc_data.topics import topics

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
"""Label of positions that no loss counts (Megatron's loss_mask, folded into the labels)."""


class EmbeddingPipe(nn.Module):
    """Token ids (b, s) -> word + position embeddings (b, s, h), then dropout."""

    def __init__(self, hidden_size: int, vocab_size: int, max_sequence_length: int, embedding_dropout_prob: float,
                 ) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size)
        self.position_embeddings = nn.Embedding(max_sequence_length, hidden_size)
        self.embedding_dropout = nn.Dropout(embedding_dropout_prob)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Positions 0 .. s-1 of every sequence (any s up to max_sequence_length)."""
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return self.embedding_dropout(self.word_embeddings(input_ids) + self.position_embeddings(position_ids))


class ParallelAttention(nn.Module):
    """Causal self-attention with a fused query_key_value projection and an output `dense` projection."""

    def __init__(self, hidden_size: int, num_attention_heads: int) -> None:
        super().__init__()
        self.num_attention_heads = num_attention_heads
        self.query_key_value = nn.Linear(hidden_size, 3 * hidden_size)
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(b, s, h) -> (b, s, h)."""
        b, s, h = hidden_states.shape
        qkv = self.query_key_value(hidden_states).view(b, s, 3, self.num_attention_heads, h // self.num_attention_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        context = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.dense(context.transpose(1, 2).reshape(b, s, h))


class ParallelMLP(nn.Module):
    """dense_h_to_4h, GeLU, dense_4h_to_h."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(hidden_size, ffn_hidden_size)
        self.dense_4h_to_h = nn.Linear(ffn_hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(b, s, h) -> (b, s, h)."""
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(hidden_states)))


class ParallelTransformerLayerPipe(nn.Module):
    """One pre-LayerNorm GPT-2 decoder layer; its class name is what partition_method="type:transformer" counts."""

    def __init__(self, hidden_size: int, num_attention_heads: int, ffn_hidden_size: int, layernorm_epsilon: float,
                 layer_number: int) -> None:
        super().__init__()
        self.layer_number = layer_number
        self.input_layernorm = nn.LayerNorm(hidden_size, eps=layernorm_epsilon)
        self.self_attention = ParallelAttention(hidden_size, num_attention_heads)
        self.post_attention_layernorm = nn.LayerNorm(hidden_size, eps=layernorm_epsilon)
        self.mlp = ParallelMLP(hidden_size, ffn_hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(b, s, h) -> (b, s, h), residual around attention and around the MLP."""
        hidden_states = hidden_states + self.self_attention(self.input_layernorm(hidden_states))
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class LMHeadPipe(nn.Module):
    """The output layer of an untied model (--untie-embeddings-and-output-weights): (b, s, h) -> (b, s, vocab)."""

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        super().__init__()
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Next-token logits."""
        return self.lm_head(hidden_states)


def CrossEntropy(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # noqa: N802 (Megatron's name)
    """Mean next-token cross entropy of (b, s, vocab) logits over the labels that are not IGNORE_INDEX, in fp32."""
    return F.cross_entropy(output.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


class GPTDataset(torch.utils.data.Dataset):
    """Samples of seq_length + 1 byte tokens of Python's reference documentation, as {"text": tokens}."""

    def __init__(self, seq_length: int, split: str) -> None:
        names = sorted(topics)
        held_out = set(names[::10])  # every tenth topic is validation text
        text = "".join(topics[k] for k in names if (k in held_out) == (split == "valid")).encode("utf-8")
        samples = len(text) // (seq_length + 1)
        data = torch.frombuffer(bytearray(text[: samples * (seq_length + 1)]), dtype=torch.uint8)
        self.samples = data.long().view(samples, seq_length + 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return {"text": self.samples[idx]}


def build_data_iterator(dataset: GPTDataset, micro_batch_size: int, data_parallel_rank: int,
                        data_parallel_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches of this data-parallel rank's share of `dataset`, reshuffled every epoch."""
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=data_parallel_size, rank=data_parallel_rank,
                                                  shuffle=True, seed=seed, drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=micro_batch_size, sampler=sampler, drop_last=True)
    return cyclic_iter(loader, sampler)


def cyclic_iter(loader: Iterable, sampler: torch.utils.data.DistributedSampler) -> Iterator:
    """Go through `loader` again and again, a new shuffle each time."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def get_batch_pipe(data: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Megatron's batch function on next(data_iterator): (tokens, labels), the labels shifted by one position."""
    tokens_ = data["text"].long()
    return tokens_[:, :-1].contiguous(), tokens_[:, 1:].contiguous()
