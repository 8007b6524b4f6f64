"""ImageBind encoders: configs, the model, checkpoint loading.

The tokenizer, preprocessing and weight download live in ``encoders.text``,
``encoders.preprocess`` and ``encoders.weights`` (imported on their own, not re-exported here).
"""

from encoders.config import ImageBindConfig, TowerConfig, config_from_reference_kwargs, get_config, list_configs
from encoders.imagebind import PRECISIONS, ImageBind, from_reference, load

__all__ = [
    "ImageBind",
    "ImageBindConfig",
    "PRECISIONS",
    "TowerConfig",
    "config_from_reference_kwargs",
    "from_reference",
    "get_config",
    "list_configs",
    "load",
]
