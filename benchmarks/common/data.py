"""Real offline data sets of different kinds, as image folders, for the accuracy tables.

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (adaptkit's own ``digits`` spec; nothing to make).
- ``glyphs``: the letters A-J rendered from the fonts installed on the machine (Debian's DejaVu and Liberation),
  each at a random size, offset, rotation, colour, noise and blur, ink always lighter or darker than the paper;
  100 training and 100 test images a letter, the test letters in fonts never seen in training: printed characters,
  not objects (a task the CIFAR-10 features do not already solve).
- ``cifar5``: five CIFAR-10 classes (airplane, automobile, bird, cat, ship), 200 train and 100 test images each,
  unpacked from ``../shared/data/cifar10.tar.gz``: natural images (the packaged backbone was pretrained on CIFAR-10,
  so this is the in-domain case).
- for the routing benchmarks (:func:`routing_specs`, no archive needed): ``glyphs20`` (letters A-T), ``photos5``
  and ``grey5`` (five CIFAR-10 classes of ``../shared/data/cifar10-mini`` in colour, the other five in grey),
  ``photos2`` (airplane, ship) and ``synthetic`` (noise, flat colours, gradients, stripes: images of no data set).
- kept out of every choice made for routing (:func:`heldout_specs`, from the archive, images no other set uses):
  ``sketch3`` (line drawings), ``photos3`` (colour photos), ``blur10`` (8x8 pixels, blown up), ``grey2`` (two classes
  in grey); and :func:`make_split`, all ten classes to split into tasks of one data set.
- ``emoji``: which Unicode group an emoji belongs to (smileys, people, animals and nature, food, travel and places,
  activities, objects, symbols: 8 classes, from Debian's ``unicode-data``), the emoji drawn from Debian's Noto Color
  Emoji font at a random size, offset, rotation, background, noise and blur; 300 training and 100 test images a
  group, the test images of emoji never seen in training: pictures of things, drawn, not photographed. Needs
  ``apt-get install fonts-noto-color-emoji unicode-data``.

Usage::

    # makes ~/.cache/adaptkit/bench/{glyphs-v2,cifar5,emoji} and prints the specs:
    python benchmarks/common/data.py
    adaptkit train --dataset folder:$HOME/.cache/adaptkit/bench/glyphs-v2 ...

The folders are made once and are deterministic (seed 0); :func:`specs` returns the ``--dataset`` strings.
"""

from __future__ import annotations

import argparse
import random
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

ROOT = Path.home() / ".cache" / "adaptkit" / "bench"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
FONT_DIRS = [Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/truetype/liberation")]
LETTERS = "ABCDEFGHIJ"
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
CIFAR5 = ("airplane", "automobile", "bird", "cat", "ship")
CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _fonts() -> list[Path]:
    fonts = sorted(p for d in FONT_DIRS if d.is_dir() for p in d.glob("*.ttf") if "Math" not in p.name)
    if len(fonts) < 4:
        raise SystemExit("glyphs needs the DejaVu or Liberation fonts: apt-get install fonts-dejavu-core "
                         "fonts-liberation")
    return fonts


def _ink_and_paper(rng: random.Random) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A random paper colour and an ink colour that differs from it in brightness, as printed text does.

    Two grey levels 100-160 apart (either one the lighter), each tinted by up to +-30 per channel: the colours vary
    as much as before, but the letter always stands out in brightness. (The first generator shifted each channel
    of the background by 96-160 modulo 256, so ink and paper often had the same brightness and differed only in
    hue: a linear probe of the packaged backbone read 20 % of the test letters, twice chance; with brightness
    contrast it reads 40 %.)
    """
    paper = rng.randint(0, 255)
    gap = rng.randint(100, 160)
    ink = paper + gap if paper + gap <= 255 else paper - gap
    if ink < 0:  # neither side fits: put the two levels symmetrically about mid-grey
        paper, ink = 128 + gap // 2, 128 - gap // 2
    if rng.random() < 0.5:
        paper, ink = ink, paper

    def tint(level: int) -> tuple[int, ...]:
        return tuple(min(255, max(0, level + rng.randint(-30, 30))) for _ in range(3))

    return tint(paper), tint(ink)


def _glyph(letter: str, font: Path, rng: random.Random, size: int = 32) -> Image.Image:
    big = size * 4
    bg, fg = _ink_and_paper(rng)
    img = Image.new("RGB", (big, big), bg)
    face = ImageFont.truetype(str(font), rng.randint(int(big * 0.45), int(big * 0.8)))
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = draw.textbbox((0, 0), letter, font=face)
    jitter = big // 8
    x = (big - (x1 - x0)) // 2 - x0 + rng.randint(-jitter, jitter)
    y = (big - (y1 - y0)) // 2 - y0 + rng.randint(-jitter, jitter)
    draw.text((x, y), letter, font=face, fill=fg)
    return _shrink(img.rotate(rng.uniform(-20, 20), resample=Image.BILINEAR, fillcolor=bg), rng, size)


def _shrink(img: Image.Image, rng: random.Random, size: int) -> Image.Image:
    """A large rendering down to ``size`` pixels, with random sensor noise and blur."""
    img = img.resize((size, size), Image.LANCZOS)
    noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, rng.uniform(0, 12), (size, size, 3))
    arr = np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))


def make_glyphs(root: Path = ROOT, train: int = 100, test: int = 100, seed: int = 0, letters: str = LETTERS,
                name: str = "glyphs-v2") -> Path:
    """Render ``train`` + ``test`` images per letter into ``root/<name>/{train,test}/<letter>/``.

    Train and test use disjoint halves of the fonts, so the test measures reading unseen typefaces.
    """
    out = root / name  # v2: ink and paper differ in brightness (see _ink_and_paper); 100 test images a letter
    if (out / "test" / letters[-1]).is_dir():
        return out
    fonts = _fonts()
    rng = random.Random(seed)
    shuffled = fonts[:]
    rng.shuffle(shuffled)
    split = {"train": shuffled[: len(fonts) * 2 // 3], "test": shuffled[len(fonts) * 2 // 3:]}
    for part, n in (("train", train), ("test", test)):
        for letter in letters:
            folder = out / part / letter
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _glyph(letter, rng.choice(split[part]), rng).save(folder / f"{i:04d}.png")
    return out


def _emoji_groups() -> dict[str, list[str]]:
    """Unicode's emoji groups (emoji-test.txt), each with its single-code-point emoji (Flags and skin-tone
    components left out: too few, or not pictures)."""
    if not EMOJI_TEST.is_file() or not EMOJI_FONT.is_file():
        raise SystemExit("emoji needs Debian's emoji font and Unicode data: apt-get install fonts-noto-color-emoji "
                         "unicode-data")
    groups: dict[str, list[str]] = {}
    group = ""
    for line in EMOJI_TEST.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif "; fully-qualified" in line and group not in ("Flags", "Component"):
            points = line.split(";")[0].split()
            if len(points) == 1 or (len(points) == 2 and points[1] == "FE0F"):
                groups.setdefault(group, []).append("".join(chr(int(p, 16)) for p in points))
    return groups


def _emoji(char: str, face: ImageFont.FreeTypeFont, rng: random.Random, size: int = 32) -> Image.Image:
    big = size * 4
    bg = tuple(rng.randint(0, 255) for _ in range(3))
    drawn = Image.new("RGBA", (136, 136), (0, 0, 0, 0))
    ImageDraw.Draw(drawn).text((0, 0), char, font=face, embedded_color=True)
    drawn = drawn.crop(drawn.getbbox() or (0, 0, 136, 136))
    scale = rng.uniform(0.5, 0.9) * big / max(drawn.size)
    drawn = drawn.resize((max(1, round(drawn.width * scale)), max(1, round(drawn.height * scale))), Image.LANCZOS)
    drawn = drawn.rotate(rng.uniform(-20, 20), resample=Image.BILINEAR, expand=True)
    img = Image.new("RGB", (big, big), bg)
    jitter = big // 8
    x = (big - drawn.width) // 2 + rng.randint(-jitter, jitter)
    y = (big - drawn.height) // 2 + rng.randint(-jitter, jitter)
    img.paste(drawn, (x, y), drawn)
    return _shrink(img, rng, size)


def make_emoji(root: Path = ROOT, train: int = 300, test: int = 100, seed: int = 0) -> Path:
    """Render ``train`` + ``test`` images per Unicode emoji group into ``root/emoji/{train,test}/<group>/``.

    A quarter of each group's emoji (seeded) are kept for the test images, so the test measures recognising the
    kind of thing an emoji never seen before shows.
    """
    out = root / "emoji"
    groups = _emoji_groups()
    names = {g: g.lower().replace(" & ", "-and-").replace(" ", "-") for g in groups}
    if all((out / "test" / n).is_dir() for n in names.values()):
        return out
    face = ImageFont.truetype(str(EMOJI_FONT), 109)  # a bitmap font: 109 px is its only size
    rng = random.Random(seed)
    for group, chars in groups.items():
        chars = chars[:]
        rng.shuffle(chars)
        split = {"test": chars[: len(chars) // 4], "train": chars[len(chars) // 4:]}
        for part, n in (("train", train), ("test", test)):
            folder = out / part / names[group]
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _emoji(rng.choice(split[part]), face, rng).save(folder / f"{i:04d}.png")
    return out


def _from_archive(out: Path, classes: tuple[str, ...], train: int, test: int, skip: int = 0,
                  look=None, archive: Path = SHARED / "cifar10.tar.gz") -> Path:
    """Images ``skip`` .. ``skip + train`` (``test``) of each class of the shared CIFAR-10 archive's train (test)
    split, each passed through ``look`` (PIL image -> PIL image) if given, into ``out/{train,test}/<class>/``."""
    if (out / "test" / classes[-1]).is_dir():
        return out
    if not archive.is_file():
        raise SystemExit(f"{archive} is missing: clone the repository beside shared/")
    want = {"train": train, "test": test}
    seen: dict[tuple[str, str], int] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] not in want or parts[-2] not in classes:
                continue
            key = (parts[-3], parts[-2])
            seen[key] = seen.get(key, 0) + 1
            if not skip < seen[key] <= skip + want[key[0]]:
                continue
            dest = out / key[0] / key[1] / parts[-1]
            dest.parent.mkdir(parents=True, exist_ok=True)
            if look is None:
                dest.write_bytes(tar.extractfile(member).read())
            else:
                look(Image.open(tar.extractfile(member)).convert("RGB")).save(dest.with_suffix(".png"))
    return out


def make_cifar5(root: Path = ROOT, train: int = 200, test: int = 100) -> Path:
    """Unpack the first ``train``/``test`` images of five CIFAR-10 classes from the shared archive."""
    return _from_archive(root / "cifar5", CIFAR5, train, test)


def make_photos(root: Path = ROOT, classes: tuple[str, ...] = CIFAR5, grey: bool = False, name: str = "") -> Path:
    """Copy some classes of ``../shared/data/cifar10-mini`` (50 train and 20 test images a class), in colour or
    converted to grey (the same grey in all three channels), into ``root/<name>/{train,test}/<class>/``."""
    out = root / (name or f"photos-{'grey' if grey else 'colour'}-{len(classes)}")
    if (out / "test" / classes[-1]).is_dir():
        return out
    src = SHARED / "cifar10-mini"
    if not src.is_dir():
        raise SystemExit(f"{src} is missing: clone the repository beside shared/")
    for part in ("train", "test"):
        for c in classes:
            folder = out / part / c
            folder.mkdir(parents=True, exist_ok=True)
            for f in sorted((src / part / c).iterdir()):
                img = Image.open(f).convert("RGB")
                (img.convert("L").convert("RGB") if grey else img).save(folder / f"{f.stem}.png")
    return out


SYNTHETIC = ("noise", "flat", "gradient", "stripes")


def _synthetic(kind: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """One made-up image that belongs to no real data set: uniform noise, a flat colour, a linear colour gradient or
    stripes of two random colours at a random angle and period."""
    if kind == "noise":
        return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    if kind == "flat":
        return Image.fromarray(np.broadcast_to(a, (size, size, 3)).astype(np.uint8))
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    angle = rng.uniform(0, np.pi)
    t = np.cos(angle) * xx + np.sin(angle) * yy
    if kind == "gradient":
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    else:
        t = (np.sin(2 * np.pi * t * rng.uniform(2, 8)) > 0).astype(np.float64)
    return Image.fromarray((a * (1 - t[..., None]) + b * t[..., None]).astype(np.uint8))


def make_synthetic(root: Path = ROOT, train: int = 50, test: int = 100, seed: int = 0) -> Path:
    """``train`` + ``test`` images of each kind of :data:`SYNTHETIC` into ``root/synthetic/{train,test}/<kind>/``:
    images of no real data set, to be told apart from every task's."""
    out = root / "synthetic"
    if (out / "test" / SYNTHETIC[-1]).is_dir():
        return out
    rng = np.random.default_rng(seed)
    for part, n in (("train", train), ("test", test)):
        for kind in SYNTHETIC:
            folder = out / part / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _synthetic(kind, rng).save(folder / f"{i:04d}.png")
    return out


OTHER5 = ("deer", "dog", "frog", "horse", "truck")  # the CIFAR-10 classes cifar5 lacks
LETTERS20 = "ABCDEFGHIJKLMNOPQRST"


def routing_specs(root: Path = ROOT) -> dict[str, str]:
    """Data sets of different kinds for the routing benchmarks (``routing_ood.py``), all made offline, with no
    archive: ``digits``; ``glyphs`` (A-J) and ``glyphs20`` (A-T, 50 + 50 images a letter); ``photos5``
    (:data:`CIFAR5` from cifar10-mini, in colour) and ``grey5`` (the other five classes, :data:`OTHER5`, in grey:
    photos that differ from ``photos5`` in colour statistics as well as classes); ``photos2`` (airplane and ship
    only: a 2-class task to pair with the 20 of ``glyphs20``); ``synthetic`` (noise, flat colours, gradients,
    stripes; as held-out images)."""
    return {"digits": "digits", "glyphs": f"folder:{make_glyphs(root)}",
            "glyphs20": f"folder:{make_glyphs(root, 50, 50, letters=LETTERS20, name='glyphs20')}",
            "photos5": f"folder:{make_photos(root, CIFAR5)}",
            "grey5": f"folder:{make_photos(root, OTHER5, grey=True)}",
            "photos2": f"folder:{make_photos(root, ('airplane', 'ship'), name='photos-colour-2')}",
            "synthetic": f"folder:{make_synthetic(root)}"}


def _sketch(img: Image.Image) -> Image.Image:
    """A photo as a line drawing: the edges of its grey image, dark lines on white, in all three channels."""
    edges = img.convert("L").filter(ImageFilter.GaussianBlur(0.7)).filter(ImageFilter.FIND_EDGES)
    return Image.eval(edges, lambda v: 255 - min(255, 2 * v)).convert("RGB")


def _blurred(img: Image.Image) -> Image.Image:
    """A photo as a low-resolution one: down to 8x8 pixels and back up."""
    return img.resize((8, 8), Image.BILINEAR).resize(img.size, Image.BILINEAR)


def _grey(img: Image.Image) -> Image.Image:
    return img.convert("L").convert("RGB")


def heldout_specs(root: Path = ROOT) -> dict[str, str]:
    """Data sets kept out of every choice made for routing (issue 23): made from images of the whole CIFAR-10
    archive past the first 200 a class (so none is in ``cifar5`` or ``cifar10-mini``), looked at only once the
    router was chosen. ``sketch3``: cat, deer and horse as line drawings (100 + 50 a class); ``photos3``:
    automobile, bird and truck in colour (100 + 50); ``blur10``: all ten classes at 8x8 pixels, blown up (40 + 20);
    ``grey2``: dog and frog in grey (50 + 25): a 2-class task beside a 10-class one. (Images ``skip`` onwards of each
    class: 200-300 for sketch3 and photos3, 300-340 for blur10, 340-390 for grey2; test images the same.)"""
    return {"sketch3": f"folder:{_from_archive(root / 'sketch3', ('cat', 'deer', 'horse'), 100, 50, 200, _sketch)}",
            "photos3": f"folder:{_from_archive(root / 'photos3', ('automobile', 'bird', 'truck'), 100, 50, 200)}",
            "blur10": f"folder:{_from_archive(root / 'blur10', CIFAR10, 40, 20, 300, _blurred)}",
            "grey2": f"folder:{_from_archive(root / 'grey2', ('dog', 'frog'), 50, 25, 340, _grey)}"}


def make_split(root: Path = ROOT) -> Path:
    """All ten CIFAR-10 classes, 200 training and 100 test images each, past the first 400 of the archive (none
    in the other sets): to split into tasks of one data set (``routing_ood.py``: 5 tasks of 2 classes)."""
    return _from_archive(root / "cifar10-split", CIFAR10, 200, 100, 400)


def _inverted(img: Image.Image) -> Image.Image:
    """A photo as its colour negative."""
    return Image.eval(img, lambda v: 255 - v)


def _rotated(img: Image.Image) -> Image.Image:
    """A photo turned a quarter (the turn picked from the image's own pixels, so the set is deterministic)."""
    return img.rotate(90 if sum(img.getpixel((0, 0))) % 2 else 270)


def _texture(rng: np.random.Generator, blur: float, size: int = 32) -> Image.Image:
    """A texture-like image of no data set: coloured noise smoothed at scale ``blur``, contrast-stretched."""
    arr = np.stack([np.asarray(Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8))
                               .filter(ImageFilter.GaussianBlur(blur)), dtype=np.float64) for _ in range(3)], -1)
    arr = (arr - arr.min()) / max(arr.max() - arr.min(), 1e-6)
    mix = rng.dirichlet(np.ones(3), 3)  # channels mixed, so the colours are not grey
    return Image.fromarray((255 * np.clip(arr @ mix, 0, 1)).astype(np.uint8))


TEXTURES = {"fine": (0.5, 1.5), "coarse": (1.5, 4.0)}  # the smoothing scale of each class, in pixels


def make_textures(root: Path = ROOT, train: int = 10, test: int = 100, seed: int = 1) -> Path:
    """``train`` + ``test`` texture-like images (:func:`_texture`) per class of :data:`TEXTURES` in
    ``root/texture/{train,test}/<class>/``."""
    out = root / "texture"
    if (out / "test" / "coarse").is_dir():
        return out
    rng = np.random.default_rng(seed)
    for part, n in (("train", train), ("test", test)):
        for name, (low, high) in TEXTURES.items():
            folder = out / part / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _texture(rng, rng.uniform(low, high)).save(folder / f"{i:04d}.png")
    return out


def unknown_specs(root: Path = ROOT) -> dict[str, str]:
    """Kinds of images no choice for rejection was made on (issue 37), only ever offered as images of no task:
    ``inverted`` (CIFAR-10 photos as colour negatives) and ``rotated`` (turned a quarter), 20 images a class from
    the archive's test split past the 600th (none in any other set); ``texture`` (smoothed coloured noise)."""
    return {"inverted": f"folder:{_from_archive(root / 'inverted', CIFAR10, 4, 20, 600, _inverted)}",
            "rotated": f"folder:{_from_archive(root / 'rotated', CIFAR10, 4, 20, 600, _rotated)}",
            "texture": f"folder:{make_textures(root)}"}


def specs(root: Path = ROOT, emoji: bool = False) -> dict[str, str]:
    """The data sets as ``--dataset`` specs, made first if needed (``emoji`` only when asked: it needs two Debian
    packages)."""
    out = {"digits": "digits", "glyphs": f"folder:{make_glyphs(root)}", "cifar5": f"folder:{make_cifar5(root)}"}
    if emoji:
        out["emoji"] = f"folder:{make_emoji(root)}"
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--no-emoji", action="store_true", help="skip the emoji set (it needs Debian packages)")
    args = parser.parse_args()
    emoji = not args.no_emoji and EMOJI_FONT.is_file() and EMOJI_TEST.is_file()
    if not emoji and not args.no_emoji:
        print("emoji skipped: it needs apt-get install fonts-noto-color-emoji unicode-data", file=sys.stderr)
    for name, spec in specs(args.root, emoji=emoji).items():
        print(f"{name}\t{spec}")
