"""Tables that stay readable anywhere: in a terminal, columns are dropped (most optional first) until the rest fit,
and no number or name is ever cut; piped or redirected, a plain table of aligned columns, whatever its width."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

__all__ = ["Col", "print_table", "render_table"]


@dataclass(frozen=True)
class Col:
    """One column: its header, whether it holds numbers (right-aligned, never wrapped), when it may go, and
    whether its text must stay whole.

    ``drop`` 0 means always shown; when the table is too wide, the column with the highest ``drop`` goes first.
    """

    header: str
    numeric: bool = False
    drop: int = 0
    whole: bool = False  # never wrapped, like a number (a name the user will type back)

    @property
    def no_wrap(self) -> bool:
        return self.numeric or self.whole


WORD_MAX = 24  # a text column keeps its longest word whole up to this width; beyond it, the word is folded


def _overhead(n: int) -> int:
    return 3 * n + 1  # per column: one space of padding each side and a border; plus the last border


def _longest_word(cols: Sequence[Col], rows: Sequence[Sequence[str]], i: int) -> int:
    return max([1, *(len(w) for r in rows for w in r[i].split())])


def _widths(cols: Sequence[Col], rows: Sequence[Sequence[str]], keep: list[int], width: int) -> list[int] | None:
    """Column widths for ``keep`` within ``width``: numbers at full width, text columns shrunk (they wrap); None
    if even the narrowest layout does not fit."""
    natural = [max([len(cols[i].header), *(len(r[i]) for r in rows)]) for i in keep]
    floor = [n if cols[i].no_wrap else min(n, max(min(_longest_word(cols, rows, i), WORD_MAX),
                                                  *map(len, cols[i].header.split())))
             for i, n in zip(keep, natural, strict=True)]
    spare = width - _overhead(len(keep)) - sum(floor)
    if spare < 0:
        return None
    widths = list(floor)
    for j in range(len(keep)):  # give the room left to the text columns, left to right
        extra = min(spare, natural[j] - widths[j])
        widths[j] += extra
        spare -= extra
    return widths


def render_table(console: Console, cols: Sequence[Col], rows: Sequence[Sequence[str]],
                 title: str | None = None) -> tuple[Table, list[str]]:
    """The rich table that fits ``console``'s width and the headers of the columns left out to make it fit."""
    keep = list(range(len(cols)))
    widths = _widths(cols, rows, keep, console.width)
    while widths is None and any(cols[i].drop > 0 for i in keep):
        keep.remove(max((i for i in keep if cols[i].drop > 0), key=lambda i: cols[i].drop))
        widths = _widths(cols, rows, keep, console.width)
    if widths is None:  # too narrow even for the columns that always stay: let the terminal wrap the lines
        widths = _widths(cols, rows, keep, 10**6)
    table = Table(title=title, title_justify="left")
    for i, w in zip(keep, widths, strict=True):
        c = cols[i]
        table.add_column(c.header, justify="right" if c.numeric else "left", no_wrap=c.no_wrap, overflow="fold",
                         width=w)
    for row in rows:
        table.add_row(*(row[i] for i in keep))
    return table, [c.header for i, c in enumerate(cols) if i not in keep]


def _plain_lines(cols: Sequence[Col], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max([len(c.header), *(len(r[i]) for r in rows)]) for i, c in enumerate(cols)]
    lines = []
    for cells in [[c.header for c in cols], *rows]:
        parts = [s.rjust(w) if c.numeric else s.ljust(w) for s, w, c in zip(cells, widths, cols, strict=True)]
        lines.append("  ".join(parts).rstrip())
    return lines


def _grouped(cols: Sequence[Col], rows: Sequence[Sequence[str]], group: int) -> tuple[list[Col], list[list[str]]]:
    """Column ``group`` taken out: its value heads each run of rows that share it, on a row of its own."""
    rest = [c for i, c in enumerate(cols) if i != group]
    out, last = [], None
    for row in rows:
        if row[group] != last:
            out.append([f"{row[group]}:", *[""] * (len(rest) - 1)])
            last = row[group]
        out.append([v for i, v in enumerate(row) if i != group])
    return rest, out


def print_table(console: Console, cols: Sequence[Col], rows: Sequence[Sequence[str]], title: str | None = None,
                group: int | None = None) -> None:
    """Print a table: fitted to the terminal, or plain (no borders, no title, nothing cut) when piped.

    ``group``: the index of a column the rows come sorted by; its value heads each group on a row of its own, so
    the table is only as wide as the other columns.
    """
    if group is not None:
        cols, rows = _grouped(cols, rows, group)
    if not console.is_terminal:
        for line in _plain_lines(cols, rows):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        return
    table, hidden = render_table(console, cols, rows, title)
    console.print(table, width=max(console.width, console.measure(table).maximum))
    if hidden:
        console.print(f"[dim]hidden at {console.width} columns: {', '.join(hidden)} (pipe the output to see every "
                      "column)[/dim]")
