"""index images by status and finish time (metrics: throughput of the last minute)

Revision ID: c7e2a9d4b1f0
Revises: 8b41f0c2d9e6
Create Date: 2026-11-26 17:30:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "c7e2a9d4b1f0"
down_revision: str | None = "8b41f0c2d9e6"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_images_status_finished", "images", ["status", "finished_at"])


def downgrade() -> None:
    op.drop_index("ix_images_status_finished", table_name="images")
