"""Data sets held in memory as uint8 tensors and a deterministic, resumable batch loader."""

from ppll_ext.data.datasets import DATASET_NAMES, ArrayDataset, DataConfig, DatasetName, dataset_shape, load_dataset
from ppll_ext.data.loader import BatchLoader

__all__ = ["DATASET_NAMES", "ArrayDataset", "BatchLoader", "DataConfig", "DatasetName", "dataset_shape",
           "load_dataset"]
