"""``python -m adaptkit.cli`` (as torchrun launches it)."""

from adaptkit.cli import app

app(prog_name="adaptkit")
