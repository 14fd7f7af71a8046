"""``python -m adaptkit.cli`` (as torchrun launches it)."""

from adaptkit.cli import app

app()
