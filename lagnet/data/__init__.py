"""Re-ID data: dataset parsers, identity-balanced samplers, transforms, a synthetic dataset."""

from __future__ import annotations

from lagnet.data.datasets import (
    CUHK03NP,
    DATASET_NAMES,
    IMAGE_EXTENSIONS,
    MSMT17,
    DukeMTMCreID,
    ImageDataset,
    Market1501,
    ReIDDataset,
    ReIDFolder,
    ReIDRecord,
    build_dataset,
    read_image,
)
from lagnet.data.samplers import DistributedPKSampler, PKSampler
from lagnet.data.synthetic import (
    MANIFEST_NAME,
    color_histogram_features,
    generate_synthetic_market,
)
from lagnet.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms

__all__ = [
    "CUHK03NP",
    "DATASET_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "MANIFEST_NAME",
    "MSMT17",
    "DistributedPKSampler",
    "DukeMTMCreID",
    "ImageDataset",
    "Market1501",
    "PKSampler",
    "ReIDDataset",
    "ReIDFolder",
    "ReIDRecord",
    "build_dataset",
    "build_transforms",
    "color_histogram_features",
    "generate_synthetic_market",
    "read_image",
]
