"""A second source of colour photos, offline: crops of the real photos bundled with scikit-learn and scikit-image.

Every other photo set of the benchmarks comes from CIFAR-10. These are photos of other objects, taken by other
cameras, at other scales: scikit-learn's two sample images (``china.jpg``, a temple; ``flower.jpg``) and four
colour photos scikit-image bundles in its wheel (``astronaut``, ``coffee``, ``rocket`` and the left image of
``stereo_motorcycle``), no download. (Its cat, ``chelsea``, is left out: cats are a CIFAR-10 class; its
scientific images, retina, Hubble and microscopy, are another kind.)

``make_other_photos`` cuts ``train`` + ``test`` square crops from each photo (side uniform in 1/8..1/3 of the
photo's shorter side, place uniform), scaled to 32 x 32 (Lanczos): training crops from the left 60 % of the photo,
test crops from the right 40 %, so no test crop shares a pixel with a training crop. Each photo is a class: a
6-class colour-photo task from a source other than CIFAR-10 (``routing_ood.py``'s look-alike groups), and, offered
to a CIFAR-10 task, colour photos of other objects from another source (an unknown kind of ``rejection.py``).
scikit-image is a benchmark-only dependency (``pip install -e .[bench]``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

OTHER_PHOTOS = ("astronaut", "china", "coffee", "flower", "motorcycle", "rocket")
TRAIN_SHARE = 0.6  # training crops lie in the left 60 % of a photo, test crops in the rest


def _photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8: one bundled photo of :data:`OTHER_PHOTOS`."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    try:
        import skimage.data
    except ImportError as e:
        raise SystemExit("the second photo source needs scikit-image: pip install -e .[bench]") from e
    return skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()


def _crops(photo: np.ndarray, n: int, left: float, right: float, rng: np.random.Generator,
           size: int = 32) -> list[Image.Image]:
    """``n`` square crops lying within columns ``left``..``right`` (shares of the width), scaled to ``size``."""
    h, w = photo.shape[:2]
    x0, x1 = int(left * w), int(right * w)
    img = Image.fromarray(photo[..., :3])
    out = []
    for _ in range(n):
        side = int(min(rng.uniform(min(h, w) / 8, min(h, w) / 3), x1 - x0, h))
        x, y = int(rng.integers(x0, x1 - side + 1)), int(rng.integers(0, h - side + 1))
        out.append(img.crop((x, y, x + side, y + side)).resize((size, size), Image.LANCZOS))
    return out


def make_other_photos(root: Path, train: int = 50, test: int = 20, seed: int = 2) -> Path:
    """Crops of :data:`OTHER_PHOTOS` (see the module's docstring) into ``root/other-photos/{train,test}/<photo>/``."""
    out = root / "other-photos"
    if (out / "test" / OTHER_PHOTOS[-1]).is_dir():
        return out
    rng = np.random.default_rng(seed)
    for name in OTHER_PHOTOS:
        photo = _photo(name)
        for part, n, (left, right) in (("train", train, (0, TRAIN_SHARE)), ("test", test, (TRAIN_SHARE, 1))):
            folder = out / part / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, crop in enumerate(_crops(photo, n, left, right, rng)):
                crop.save(folder / f"{i:04d}.png")
    return out
