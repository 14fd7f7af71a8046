"""Sizes and parameter counts as 64-bit integers.

On PostgreSQL ``INTEGER`` is 32-bit: a full fine-tune of ViT-H/14 (632 M parameters, 2.5 GB in fp32) would not fit
in ``adapter_versions.bytes``. SQLite's INTEGER is 64-bit already, so there this revision changes nothing.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = [("adapter_versions", "bytes"), ("adapter_versions", "trainable_params"), ("backbones", "num_params")]


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    for table, column in COLUMNS:
        op.alter_column(table, column, type_=sa.BigInteger(), existing_type=sa.Integer(), existing_nullable=False)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    for table, column in COLUMNS:
        op.alter_column(table, column, type_=sa.Integer(), existing_type=sa.BigInteger(), existing_nullable=False)
