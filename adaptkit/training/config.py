"""The training recipe, :class:`TrainConfig`, with each method's default learning rate and weight decay
(:data:`METHOD_DEFAULTS`, scaled to the batch by :func:`scaled_lr`), and what training reports back:
:class:`TrainEvent` after every step and evaluation, :class:`TrainResult` at the end.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from adaptkit.checks import MAX_BATCH, MAX_EPOCHS, MAX_SEED, MAX_WORKERS, check_float
from adaptkit.errors import ConfigError
from adaptkit.settings import check_settings, choices, floats, ints, setting

if TYPE_CHECKING:  # the recipe is read by the CLI before torch is imported
    from adaptkit.methods import TaskModel
    from adaptkit.registry import VersionRow

__all__ = ["METHOD_DEFAULTS", "LR_REFERENCE_BATCH", "TrainConfig", "TrainEvent", "TrainResult", "scaled_lr"]

# Per-method base learning rate (for a batch of 256; see `scaled_lr`) and weight decay, AdamW, after the published
# recipes, and for the adapter measured: at the default budget (10 epochs, batch 64, light augmentation) 7.5e-3 beat
# 2.5e-3 by 4 to 8 points on digits and glyphs and was within 0.6 on cifar5 (README, "Training defaults that work
# without tuning", has the sweep; `benchmarks/accuracy/recipe_table.py`):
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


def _check_lr(name: str, value: Any) -> None:
    if isinstance(value, str) and value != "auto":
        raise ConfigError(f"{name} must be a number greater than 0, 'auto' or None, got {value!r}")
    if value != "auto":
        check_float(name, value, 0, low_open=True, optional=True)


def _check_device(name: str, value: Any) -> None:
    if value is not None:
        from adaptkit.devices import resolve_device

        resolve_device(value, check_available=False)


def _check_crop_scale(name: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ConfigError(f"{name} must be a pair (low, high), got {value!r}")
    low, high = value
    check_float(f"{name}[1]", high, 0, 1, low_open=True)
    check_float(f"{name}[0]", low, 0, high, low_open=True)


@dataclass
class TrainConfig:
    """The recipe: every setting with its default, its help and its check, declared once here; the CLI's options and
    the page's fields take them from here (:mod:`adaptkit.settings`).

    ``lr`` is the peak learning rate: a number, None for the method's base rate scaled to the batch size
    (:func:`scaled_lr`), or ``"auto"`` for a short sweep on the validation split (:mod:`adaptkit.training.lr_search`).
    ``weight_decay`` left as None takes the method's default (:data:`METHOD_DEFAULTS`). ``augment`` is a level,
    ``none``, ``light`` or ``strong`` (``build_transform``; True/False mean light/none), with flips only if ``flip``.
    ``threads`` is torch's CPU thread count while training (None: :func:`default_threads`).

    Raises:
        ConfigError: on construction, naming the first setting out of its range.
    """

    epochs: int = setting(10, "Passes over the training set", check=ints(1, MAX_EPOCHS))
    batch_size: int = setting(64, "Images per step", check=ints(1, MAX_BATCH))
    lr: float | str | None = setting(None, "Peak learning rate, or auto: a short sweep on the validation split "
                                     "[default: the method's base rate x batch/256]", check=_check_lr)
    weight_decay: float | None = setting(None, "AdamW weight decay [default: the method's]",
                                         check=floats(0, optional=True))
    warmup_epochs: float = setting(1.0, "Linear warm-up, in epochs", check=floats(0, MAX_EPOCHS))
    min_lr_ratio: float = setting(0.01, "The cosine schedule's last rate, as a share of the peak",
                                  check=floats(0, 1))
    label_smoothing: float = setting(0.1, "Label smoothing, in [0, 1)", check=floats(0, 1, high_open=True))
    grad_clip: float | None = setting(1.0, "Clip the gradient norm to this (None: no clipping)",
                                      check=floats(0, low_open=True, optional=True))
    seed: int = setting(0, "Seeds the split, the order and the initialisation", check=ints(0, MAX_SEED))
    device: str | None = setting(None, "cpu, cuda, cuda:N or mps [default: cuda if available]",
                                 check=_check_device)
    precision: str = setting("auto", "auto (bf16 on CUDA), bf16 or fp32", check=choices("auto", "bf16", "fp32"))
    num_workers: int | None = setting(None, "Data loader workers", check=ints(0, MAX_WORKERS, optional=True))
    val_fraction: float = setting(0.1, "The share of the training images held out for validation",
                                  check=floats(0, 1, high_open=True))
    augment: str | bool = setting("light", "none, light (random crops of 60-100%) or strong (8-100% and colour "
                                  "jitter)")
    flip: bool = setting(False, "Random horizontal flips (wrong for text, digits ...)")
    threads: int | None = setting(None, "CPU threads [default: the idle cores, 1-4]",
                                  check=ints(1, 1024, optional=True))
    crop_scale: tuple[float, float] | None = setting(None, "The random crops' area range (low, high) [default: "
                                                     "the augmentation level's]", check=_check_crop_scale)
    limit_train: int | None = setting(None, "Use only N training images", check=ints(1, optional=True))
    limit_eval: int | None = setting(None, "Use only N val and N test images", check=ints(1, optional=True))
    checkpointing: bool = setting(False, "Activation checkpointing in the blocks: less memory, about one more "
                                  "forward pass")
    feature_cache: bool = setting(True, "With no augmentation, run the frozen blocks once per image, not once per "
                                  "epoch")

    def __post_init__(self) -> None:
        from adaptkit.data.transforms import augment_level

        check_settings(self)
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
