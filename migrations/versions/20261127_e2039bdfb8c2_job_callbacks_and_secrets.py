"""signed job callbacks: the job's callback state and each client's signing secret

Revision ID: e2039bdfb8c2
Revises: c7e2a9d4b1f0
Create Date: 2026-11-27 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "e2039bdfb8c2"
down_revision: str | None = "c7e2a9d4b1f0"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "callback_secrets",
        sa.Column("client", sa.String(length=100), nullable=False),
        sa.Column("secret", sa.String(length=100), nullable=False),
        sa.Column("created_at", WHEN, nullable=False),
        sa.PrimaryKeyConstraint("client"),
    )
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("callback_url", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("callback_status", sa.String(length=16), nullable=True))
        batch_op.add_column(
            sa.Column("callback_attempts", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(sa.Column("callback_due_at", WHEN, nullable=True))
        batch_op.add_column(sa.Column("callback_next_at", WHEN, nullable=True))
        batch_op.add_column(sa.Column("callback_error_code", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("callback_http_status", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("callback_delivered_at", WHEN, nullable=True))
        batch_op.create_index("ix_jobs_callback", ["callback_status", "callback_next_at"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_index("ix_jobs_callback")
        for column in (
            "callback_delivered_at",
            "callback_http_status",
            "callback_error_code",
            "callback_next_at",
            "callback_due_at",
            "callback_attempts",
            "callback_status",
            "callback_url",
        ):
            batch_op.drop_column(column)
    op.drop_table("callback_secrets")
