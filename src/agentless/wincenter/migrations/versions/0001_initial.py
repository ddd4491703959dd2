"""The first schema: tokens, audit, tasks, and the inventory (hosts, pools, VMs, disks, NICs).

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def _time(name: str, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "tokens",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        _time("created"),
        _time("revoked", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_tokens"),
        sa.UniqueConstraint("sha256", name="uq_tokens_sha256"),
    )
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        _time("time"),
        sa.Column("token_id", sa.Integer(), nullable=True),
        sa.Column("token_name", sa.String(255), nullable=True),
        sa.Column("role", sa.String(32), nullable=True),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("path", sa.String(2048), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("result", sa.String(1024), nullable=False),
        sa.ForeignKeyConstraint(["token_id"], ["tokens.id"], name="fk_audit_token_id_tokens"),
        sa.PrimaryKeyConstraint("id", name="pk_audit"),
    )
    op.create_index("ix_audit_time", "audit", ["time"])
    op.create_table(
        "tasks",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("owner_key", sa.String(255), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("done", sa.BigInteger(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        _time("created"),
        _time("updated"),
        _time("expires_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_tasks"),
        sa.UniqueConstraint("kind", "owner_key", name="uq_tasks_kind_owner_key"),
    )
    op.create_index("ix_tasks_created", "tasks", ["created"])
    op.create_index("ix_tasks_state_kind", "tasks", ["state", "kind"])
    op.create_table(
        "hosts",
        sa.Column("uuid", sa.String(36), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("token_sealed", sa.LargeBinary(), nullable=False),
        sa.Column("cert_pem", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        _time("last_sync", nullable=True),
        sa.PrimaryKeyConstraint("uuid", name="pk_hosts"),
        sa.UniqueConstraint("name", name="uq_hosts_name"),
    )
    op.create_table(
        "pools",
        sa.Column("uuid", sa.String(36), nullable=False),
        sa.Column("host_uuid", sa.String(36), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("path", sa.String(4096), nullable=False),
        sa.Column("is_default", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["host_uuid"], ["hosts.uuid"], name="fk_pools_host_uuid_hosts", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("uuid", name="pk_pools"),
    )
    op.create_index("ix_pools_host_uuid", "pools", ["host_uuid"])
    op.create_table(
        "vms",
        sa.Column("uuid", sa.String(36), nullable=False),
        sa.Column("host_uuid", sa.String(36), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("vcpus", sa.Integer(), nullable=False),
        sa.Column("memory", sa.BigInteger(), nullable=False),
        sa.Column("power_state", sa.String(16), nullable=False),
        sa.ForeignKeyConstraint(
            ["host_uuid"], ["hosts.uuid"], name="fk_vms_host_uuid_hosts", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("uuid", name="pk_vms"),
    )
    op.create_index("ix_vms_host_uuid", "vms", ["host_uuid"])
    op.create_table(
        "vm_disks",
        sa.Column("vm_uuid", sa.String(36), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("vdi_uuid", sa.String(36), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("pool_uuid", sa.String(36), nullable=True),
        sa.ForeignKeyConstraint(
            ["pool_uuid"], ["pools.uuid"], name="fk_vm_disks_pool_uuid_pools", ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["vm_uuid"], ["vms.uuid"], name="fk_vm_disks_vm_uuid_vms", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("vm_uuid", "position", name="pk_vm_disks"),
    )
    op.create_table(
        "vm_nics",
        sa.Column("vm_uuid", sa.String(36), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("mac", sa.String(17), nullable=False),
        sa.Column("network", sa.String(255), nullable=False),
        sa.ForeignKeyConstraint(["vm_uuid"], ["vms.uuid"], name="fk_vm_nics_vm_uuid_vms", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("vm_uuid", "position", name="pk_vm_nics"),
    )


def downgrade() -> None:
    for table in ("vm_nics", "vm_disks", "vms", "pools", "hosts", "tasks", "audit", "tokens"):
        op.drop_table(table)
