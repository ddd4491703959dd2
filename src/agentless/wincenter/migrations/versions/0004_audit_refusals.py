"""Audit refusals without a valid token are counted per source, method, status and time
window (one row each) instead of one row per call: a flood cannot grow the table.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("audit", sa.Column("source", sa.String(64), nullable=True))
    op.add_column("audit", sa.Column("count", sa.Integer(), server_default="1", nullable=False))
    op.add_column("audit", sa.Column("last", sa.DateTime(timezone=True), nullable=True))
    op.add_column("audit", sa.Column("bucket", sa.String(64), nullable=True))
    op.create_index("ix_audit_bucket", "audit", ["bucket"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_audit_bucket", table_name="audit")
    with op.batch_alter_table("audit") as batch:
        batch.drop_column("bucket")
        batch.drop_column("last")
        batch.drop_column("count")
        batch.drop_column("source")
