"""drop columns written but never read

Job.image_count (the API counts the images), Image.size_bytes, Chunk.started_at,
Chunk.finished_at and Result.created_at (Image.finished_at says when a result was written).

Revision ID: 5d2c81e0a7b3
Revises: 1a4b6755f9c5
Create Date: 2026-11-26 16:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5d2c81e0a7b3"
down_revision: str | None = "1a4b6755f9c5"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DROPPED = {
    "jobs": ["image_count"],
    "images": ["size_bytes"],
    "chunks": ["started_at", "finished_at"],
    "results": ["created_at"],
}


def upgrade() -> None:
    for table, columns in DROPPED.items():
        with op.batch_alter_table(table) as batch_op:
            for column in columns:
                batch_op.drop_column(column)


def downgrade() -> None:
    # the values are gone: counts come back as 0, times as NULL or the time of the downgrade
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(
            sa.Column("image_count", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("images") as batch_op:
        batch_op.add_column(
            sa.Column("size_bytes", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("chunks") as batch_op:
        batch_op.add_column(sa.Column("started_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("results") as batch_op:
        batch_op.add_column(
            sa.Column(
                "created_at",
                sa.DateTime(timezone=True),
                nullable=False,
                server_default=sa.func.now(),
            )
        )
