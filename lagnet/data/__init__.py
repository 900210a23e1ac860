"""Re-ID data: dataset parsers, samplers, transforms, the image cache, a synthetic dataset."""

from __future__ import annotations

from lagnet.data.batch_transform import AugmentDecisions, BatchTransform
from lagnet.data.cached_loader import CACHE_MODES, CachedLoader, choose_cache
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
from lagnet.data.image_cache import ImageCache
from lagnet.data.loaders import build_loader, default_workers
from lagnet.data.samplers import DistributedPKSampler, PKSampler
from lagnet.data.synthetic import (
    MANIFEST_NAME,
    color_histogram_features,
    generate_synthetic_market,
)
from lagnet.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms

__all__ = [
    "CACHE_MODES",
    "CUHK03NP",
    "DATASET_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "MANIFEST_NAME",
    "MSMT17",
    "AugmentDecisions",
    "BatchTransform",
    "CachedLoader",
    "DistributedPKSampler",
    "DukeMTMCreID",
    "ImageCache",
    "ImageDataset",
    "Market1501",
    "PKSampler",
    "ReIDDataset",
    "ReIDFolder",
    "ReIDRecord",
    "build_dataset",
    "build_loader",
    "build_transforms",
    "choose_cache",
    "color_histogram_features",
    "default_workers",
    "generate_synthetic_market",
    "read_image",
]
