"""fair dispatch and quotas: per-key priority and limits, and each job's priority

Revision ID: f3a9c1d27b64
Revises: e2039bdfb8c2
Create Date: 2026-11-28 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "f3a9c1d27b64"
down_revision: str | None = "e2039bdfb8c2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch_op:
        batch_op.add_column(sa.Column("priority", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("max_images_in_flight", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("max_submissions_per_minute", sa.Integer(), nullable=True))
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("priority", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("priority")
    with op.batch_alter_table("api_keys") as batch_op:
        batch_op.drop_column("max_submissions_per_minute")
        batch_op.drop_column("max_images_in_flight")
        batch_op.drop_column("priority")
