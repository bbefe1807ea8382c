"""DICOM UIDs, PACS delivery state, the job's source and PACS pulls

Revision ID: 8b41f0c2d9e6
Revises: 5d2c81e0a7b3
Create Date: 2026-11-26 16:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "8b41f0c2d9e6"
down_revision: str | None = "5d2c81e0a7b3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UID = sa.String(length=64)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(
            sa.Column("source", sa.String(length=16), server_default="upload", nullable=False)
        )
        batch_op.add_column(sa.Column("pull_request", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("pull_status", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("pull_error_code", sa.String(length=64), nullable=True))
        batch_op.add_column(
            sa.Column("pull_attempted_at", sa.DateTime(timezone=True), nullable=True)
        )
    with op.batch_alter_table("images") as batch_op:
        batch_op.add_column(sa.Column("study_instance_uid", UID, nullable=True))
        batch_op.add_column(sa.Column("series_instance_uid", UID, nullable=True))
        batch_op.add_column(sa.Column("sop_instance_uid", UID, nullable=True))
        batch_op.add_column(sa.Column("sop_class_uid", UID, nullable=True))
        batch_op.add_column(sa.Column("pacs_delivery", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("pacs_error_code", sa.String(length=64), nullable=True))
        batch_op.add_column(
            sa.Column("pacs_attempted_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.create_index("ix_images_job_study", ["job_id", "study_instance_uid"])
        batch_op.create_index("ix_images_pacs_delivery", ["pacs_delivery"])


def downgrade() -> None:
    with op.batch_alter_table("images") as batch_op:
        batch_op.drop_index("ix_images_pacs_delivery")
        batch_op.drop_index("ix_images_job_study")
        for column in (
            "pacs_attempted_at",
            "pacs_error_code",
            "pacs_delivery",
            "sop_class_uid",
            "sop_instance_uid",
            "series_instance_uid",
            "study_instance_uid",
        ):
            batch_op.drop_column(column)
    with op.batch_alter_table("jobs") as batch_op:
        for column in ("pull_attempted_at", "pull_error_code", "pull_status", "pull_request"):
            batch_op.drop_column(column)
        batch_op.drop_column("source")
