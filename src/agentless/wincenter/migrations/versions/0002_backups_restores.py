"""Backups and restores: one record per backup id and restore id, each with its task.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def _time(name: str, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "backups",
        sa.Column("backup_id", sa.String(255), nullable=False),
        sa.Column("task_id", sa.String(36), nullable=False),
        sa.Column("vm_uuid", sa.String(36), nullable=False),
        sa.Column("host_uuid", sa.String(36), nullable=False),
        sa.Column("requested", sa.String(16), nullable=False),
        sa.Column("type", sa.String(16), nullable=True),
        sa.Column("base_backup_id", sa.String(255), nullable=True),
        sa.Column("snapshot", sa.String(36), nullable=True),
        sa.Column("snapshot_released", sa.Boolean(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        _time("created"),
        _time("finished", nullable=True),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name="fk_backups_task_id_tasks"),
        sa.PrimaryKeyConstraint("backup_id", name="pk_backups"),
        sa.UniqueConstraint("task_id", name="uq_backups_task_id"),
    )
    op.create_index("ix_backups_vm_uuid", "backups", ["vm_uuid"])
    op.create_index("ix_backups_state", "backups", ["state"])
    op.create_table(
        "restores",
        sa.Column("restore_id", sa.String(255), nullable=False),
        sa.Column("task_id", sa.String(36), nullable=False),
        sa.Column("host_uuid", sa.String(36), nullable=False),
        sa.Column("vm_uuid", sa.String(36), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        _time("created"),
        _time("finished", nullable=True),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name="fk_restores_task_id_tasks"),
        sa.PrimaryKeyConstraint("restore_id", name="pk_restores"),
        sa.UniqueConstraint("task_id", name="uq_restores_task_id"),
    )
    op.create_index("ix_restores_state", "restores", ["state"])


def downgrade() -> None:
    op.drop_index("ix_restores_state", table_name="restores")
    op.drop_table("restores")
    op.drop_index("ix_backups_state", table_name="backups")
    op.drop_index("ix_backups_vm_uuid", table_name="backups")
    op.drop_table("backups")
