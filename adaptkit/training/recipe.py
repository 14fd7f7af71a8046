"""The training recipe recorded with every version, as one line a person reads (``adaptkit show``).

The recipe is the ``recipe`` entry of a version's ``train`` record (see :func:`adaptkit.training.train`): the
:class:`~adaptkit.training.TrainConfig` as it ran, plus the learning rate as given (None for the method's default,
``"auto"`` for a sweep, whose trials are kept under ``lr_search``), the device type and the CPU threads.
"""

from __future__ import annotations

from typing import Any

__all__ = ["describe_recipe"]


def _lr_text(recipe: dict[str, Any]) -> str:
    used, given = recipe.get("lr"), recipe.get("lr_given")
    text = f"lr {used:.2g}" if isinstance(used, (int, float)) else "lr ?"
    search = recipe.get("lr_search")
    if given == "auto" and search:
        tried = ", ".join(f"{t['lr']:.2g}: {100 * t['val_top1']:.1f}%" for t in search["trials"])
        return f"{text} (auto, best validation top-1 of {tried}; {search['epochs']} epoch(s) each)"
    if "lr_given" in recipe and given is None:
        return f"{text} (the method's default for batch {recipe.get('batch_size')})"
    return text


def describe_recipe(train: dict[str, Any] | None) -> str:
    """One line for a version's ``train`` record, e.g. ``lr 0.001 (...), 10 epochs, batch 64, augment light ...``.

    Args:
        train: the version's ``train`` JSON (``VersionRow.train``); older and imported versions may lack a recipe.

    Returns:
        The recipe in words, or a note that none was recorded.
    """
    recipe = (train or {}).get("recipe")
    if not recipe:
        source = (train or {}).get("imported_from")
        return f"not recorded (imported from {source})" if source else "not recorded"
    augment = recipe.get("augment")
    augment = {True: "augment (crop + flip)", False: "no augmentation"}.get(augment, f"augment {augment}")
    epochs = recipe.get("epochs")
    parts = [_lr_text(recipe), f"{epochs} epoch{'s' * (epochs != 1)}", f"batch {recipe.get('batch_size')}",
             f"warm-up {recipe.get('warmup_epochs')}", f"weight decay {recipe.get('weight_decay'):.2g}"
             if isinstance(recipe.get("weight_decay"), (int, float)) else "weight decay ?",
             augment + (" + flip" if recipe.get("flip") else ""), f"seed {recipe.get('seed')}"]
    if recipe.get("device"):
        threads = recipe.get("threads")
        parts.append(recipe["device"] + (f", {threads} thread{'s' * (threads != 1)}" if threads else ""))
    return ", ".join(parts)
