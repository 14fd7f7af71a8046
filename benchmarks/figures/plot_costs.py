"""Draw the docs' chart of accuracy against trainable parameters, per method and data set, as an SVG.

The figures are the rows ``benchmarks/accuracy/method_table.py`` measured (``benchmarks/results/method_table.json``, the
method table of ``docs/measured.md``); this only draws them, with no plotting library: ``python
benchmarks/figures/plot_costs.py`` writes ``docs/assets/cost-accuracy.svg``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COLOURS = {"digits": "#1f77b4", "glyphs": "#d62728", "cifar5": "#2ca02c"}
W, H, LEFT, RIGHT, TOP, BOTTOM = 760, 420, 70, 170, 40, 60
LABELLED = "glyphs"  # the set whose points are spread out enough to carry the method names
BELOW = {"ssf", "lora"}  # labels put under their point, clear of a neighbour's


def method_table(path: Path) -> list[tuple[str, str, float, int]]:
    """(data set, method, top-1 %, trainable parameters) of every row ``method_table.py`` finished."""
    rows = []
    for key, row in sorted(json.loads(path.read_text()).items()):
        data, method, config = key.split("|", 2)
        config = json.loads(config)
        if config.get("placement") == "adapterplus":
            method = "Adapter+"
        elif "blocks" in config:
            method += f" --blocks {config['blocks']}"
        rows.append((data, method, 100 * row["test_top1"], row["trainable_params"]))
    if not rows:
        raise SystemExit(f"no finished rows in {path}: run benchmarks/accuracy/method_table.py first")
    return rows


def svg(rows: list[tuple[str, str, float, int]]) -> str:
    lo, hi = math.log10(min(r[3] for r in rows)) - 0.1, math.log10(max(r[3] for r in rows)) + 0.1
    x = lambda n: LEFT + (math.log10(n) - lo) / (hi - lo) * (W - LEFT - RIGHT - 40)  # noqa: E731
    y = lambda a: TOP + (100 - a) / 100 * (H - TOP - BOTTOM)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="sans-serif" font-size="12">', f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{LEFT}" y="22" font-size="15" font-weight="bold">Test top-1 against trainable parameters '
           '(packaged backbone, default recipe)</text>']
    for a in range(0, 101, 20):
        out.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y(a):.1f}" y2="{y(a):.1f}" stroke="#ddd"/>'
                   f'<text x="{LEFT - 8}" y="{y(a) + 4:.1f}" text-anchor="end">{a}%</text>')
    for e in range(math.ceil(lo), math.floor(hi) + 1):
        out.append(f'<line x1="{x(10 ** e):.1f}" x2="{x(10 ** e):.1f}" y1="{TOP}" y2="{H - BOTTOM}" stroke="#ddd"/>'
                   f'<text x="{x(10 ** e):.1f}" y="{H - BOTTOM + 18}" text-anchor="middle">{10 ** e:,}</text>')
    out.append(f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 18}" text-anchor="middle">trainable parameters '
               '(log scale)</text>')
    for data, method, acc, params in rows:
        c = COLOURS.get(data, "#555")
        shape = (f'<rect x="{x(params) - 5:.1f}" y="{y(acc) - 5:.1f}" width="10" height="10" fill="{c}"/>'
                 if method == "full" else f'<circle cx="{x(params):.1f}" cy="{y(acc):.1f}" r="5" fill="{c}"/>')
        out.append(shape)
        if data == LABELLED:  # the methods sit at about the same x on every data set: one set's labels name them
            out.append(f'<text x="{x(params) + 7:.1f}" y="{y(acc) + (14 if method in BELOW else -7):.1f}" '
                       f'font-size="10" fill="{c}">{method}</text>')
    for i, (data, c) in enumerate((d, c) for d, c in COLOURS.items() if any(r[0] == d for r in rows)):
        out.append(f'<circle cx="{W - RIGHT + 25}" cy="{TOP + 20 + 20 * i}" r="5" fill="{c}"/>'
                   f'<text x="{W - RIGHT + 35}" y="{TOP + 24 + 20 * i}">{data}</text>')
    out.append(f'<rect x="{W - RIGHT + 20}" y="{TOP + 75}" width="10" height="10" fill="#555"/>'
               f'<text x="{W - RIGHT + 35}" y="{TOP + 84}">full fine-tuning</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "method_table.json")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "assets" / "cost-accuracy.svg")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(svg(method_table(args.results)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
