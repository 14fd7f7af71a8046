"""The training recipe, :class:`TrainConfig`, with each method's default learning rate and weight decay
(:data:`METHOD_DEFAULTS`, scaled to the batch by :func:`scaled_lr`), and what training reports back:
:class:`TrainEvent` after every step and evaluation, :class:`TrainResult` at the end.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from adaptkit.data import augment_level
from adaptkit.errors import ConfigError
from adaptkit.methods import TaskModel
from adaptkit.registry import VersionRow
from adaptkit.training.checks import check_config

__all__ = ["METHOD_DEFAULTS", "LR_REFERENCE_BATCH", "TrainConfig", "TrainEvent", "TrainResult", "scaled_lr"]

# Per-method base learning rate (for a batch of 256; see `scaled_lr`) and weight decay, AdamW, after the published
# recipes, and for the adapter measured: at the default budget (10 epochs, batch 64, light augmentation) 7.5e-3 beat
# 2.5e-3 by 4 to 8 points on digits and glyphs and was within 0.6 on cifar5 (README, "Training defaults that work
# without tuning", has the sweep; `benchmarks/recipe_table.py`):
#   adapter: AdaptFormer (Chen et al. 2022) and Houlsby et al. 2019 train adapters at 1e-3 with warm-up, for far
#            longer budgets (VTAB-1k: 100 epochs); ten epochs on a thousand images are 150 steps and want more;
#   lora:    LoRA on ViTs (Hu et al. 2021; PEFT's image-classification guide) uses 1e-3 to 5e-3;
#   linear:  linear probes (MAE, He et al. 2022) use a large rate and no weight decay;
#   full:    full fine-tuning (DeiT/BEiT recipes, Touvron et al. 2021) uses 5e-5 to 1e-4 and weight decay 0.05.
#   ssf:     SSF (Lian et al. 2022) trains its scales and shifts with AdamW at 5e-3 to 1e-2 (VTAB, FGVC);
#   bitfit:  bias tuning on ViTs (V-PETL Bench; Zaken et al. 2021 use 1e-4 to 1e-3 on BERT) wants a larger rate
#            than adapters, as each bias is one vector;
#   vpt:     VPT (Jia et al. 2022) tunes prompts with large rates (SGD, base lr up to 50 x batch / 256); with AdamW
#            1e-2 is the common choice (PETL_Vision, PILOT), no weight decay on the prompts.
METHOD_DEFAULTS: dict[str, dict[str, float]] = {
    "adapter": {"lr": 3e-2, "weight_decay": 1e-4},
    "lora": {"lr": 1e-2, "weight_decay": 1e-4},
    "ssf": {"lr": 2e-2, "weight_decay": 1e-4},
    "bitfit": {"lr": 2e-2, "weight_decay": 0.0},
    "vpt": {"lr": 4e-2, "weight_decay": 0.0},
    "linear": {"lr": 4e-2, "weight_decay": 0.0},
    "full": {"lr": 4e-4, "weight_decay": 0.05},
}
LR_REFERENCE_BATCH = 256


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """The linear scaling rule, lr = base_lr * batch / 256 (Goyal et al. 2017), as MAE, VPT and AdaptFormer state
    their recipes: the AdamW step is an average over the batch, so a larger batch takes fewer, less noisy steps that
    can each be larger. (A square-root rule is argued for Adam by Malladi et al. 2022; the published PETL recipes and
    our three-data-set table use the linear one.)"""
    return base_lr * batch_size / LR_REFERENCE_BATCH


@dataclass
class TrainConfig:
    """The recipe.

    ``lr`` is the peak learning rate: a number, None for the method's base rate scaled to the batch size
    (:func:`scaled_lr`), or ``"auto"`` for a short sweep on the validation split (:mod:`adaptkit.training.lr_search`).
    ``weight_decay`` left as None takes the method's default (:data:`METHOD_DEFAULTS`). ``augment`` is a level,
    ``none``, ``light`` or ``strong`` (``build_transform``; True/False mean light/none), with flips only if ``flip``.
    ``threads`` is torch's CPU thread count while training (None: :func:`default_threads`).
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float | str | None = None
    weight_decay: float | None = None
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0
    seed: int = 0
    device: str | None = None
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on the CPU; or "bf16", "fp32"
    num_workers: int | None = None
    val_fraction: float = 0.1
    augment: str | bool = "light"
    flip: bool = False
    threads: int | None = None
    crop_scale: tuple[float, float] | None = None
    limit_train: int | None = None
    limit_eval: int | None = None
    checkpointing: bool = False  # activation checkpointing in the blocks: less memory, one more forward pass
    feature_cache: bool = True  # with no augmentation, run the frozen blocks once per image (training/feature_cache.py)

    def __post_init__(self) -> None:
        check_config(self)
        self.augment = augment_level(self.augment)
        if self.lr == "auto" and self.val_fraction <= 0:
            raise ConfigError("lr='auto' picks the rate on the validation split: keep val_fraction above 0 "
                              "or give a learning rate")

    def resolved(self, method: str) -> TrainConfig:
        """This recipe with the method's defaults filled in (``lr="auto"`` stays for :func:`train` to search)."""
        defaults = METHOD_DEFAULTS.get(method, {})
        values = asdict(self)
        if values["lr"] is None:
            values["lr"] = scaled_lr(defaults.get("lr", 1e-3), self.batch_size)
        if values["weight_decay"] is None:
            values["weight_decay"] = defaults.get("weight_decay", 0.0)
        return TrainConfig(**values)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class TrainEvent:
    """Progress, sent to the caller's callback after every step and evaluation."""

    phase: str  # "search" (a trial of lr="auto"), "lr" (its choice), "train", "val", "test", "save"
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float | None = None
    accuracy: float | None = None
    images_per_s: float | None = None
    lr: float | None = None  # "train": the step's; "search": the trial's; "lr": the one the search chose
    step_loss: float | None = None  # "train": this step's loss (``loss`` is the epoch's running mean)


@dataclass
class TrainResult:
    version: VersionRow | None  # None on ranks other than 0
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    model: TaskModel | None = None
    init_from: dict[str, Any] | None = None  # the warm start, as recorded with the version
