"""Data for adaptkit tasks: where images come from (``sources``; Hugging Face data sets in ``hf``), how they are read
(``images``) and transformed (``transforms``). The names below are the public ones; import them from
``adaptkit.data``."""

from adaptkit.data.hf import HF_SPECS, HFImages
from adaptkit.data.images import IMG_EXTENSIONS, MAX_SIDE, open_image, to_rgb
from adaptkit.data.sources import (
    BUILTIN,
    SPEC_RULE,
    TORCHVISION_SETS,
    DatasetInfo,
    ImageFiles,
    TaskData,
    TransformedSubset,
    builtin_name,
    default_data_dir,
    list_datasets,
    load_task_data,
    without_builtin,
)
from adaptkit.data.transforms import AUGMENT_LEVELS, ImageTransform, augment_level, build_transform

__all__ = ["AUGMENT_LEVELS", "BUILTIN", "HF_SPECS", "IMG_EXTENSIONS", "MAX_SIDE", "SPEC_RULE", "TORCHVISION_SETS",
           "DatasetInfo", "HFImages", "ImageFiles", "ImageTransform", "TaskData", "TransformedSubset", "augment_level",
           "build_transform", "builtin_name", "default_data_dir",
           "list_datasets", "load_task_data", "open_image", "to_rgb", "without_builtin"]
