"""Data sets (images in memory as uint8 tensors, text as blocks of token ids) and a deterministic, resumable batch
loader."""

from ppll_ext.data.datasets import DATASET_NAMES, ArrayDataset, DataConfig, DatasetName
from ppll_ext.data.loader import BatchLoader
from ppll_ext.data.registry import dataset_shape, load_dataset, shape_of
from ppll_ext.data.text import TEXT_SOURCES, TokenDataset, Tokenizer, load_tokenizer, tokenizer_digest

__all__ = ["DATASET_NAMES", "TEXT_SOURCES", "ArrayDataset", "BatchLoader", "DataConfig", "DatasetName", "TokenDataset",
           "Tokenizer", "dataset_shape", "load_dataset", "load_tokenizer", "shape_of", "tokenizer_digest"]
