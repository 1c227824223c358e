"""Durable webhooks: the webhook_outbox table (one row per delivery, resumed after a restart) and
webhook_deliveries.delivery_id linking each attempt to its delivery.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('webhook_outbox',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('delivery_id', sa.String(length=32), nullable=False),
    sa.Column('task_id', sa.String(length=32), nullable=True),
    sa.Column('event', sa.String(length=32), nullable=False),
    sa.Column('url', sa.String(length=2048), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('secret', sa.String(length=256), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(), nullable=False),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.Column('last_status_code', sa.Integer(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('delivery_id')
    )
    with op.batch_alter_table('webhook_outbox', schema=None) as batch_op:
        batch_op.create_index('ix_webhook_outbox_status_id', ['status', 'id'], unique=False)
        batch_op.create_index(batch_op.f('ix_webhook_outbox_task_id'), ['task_id'], unique=False)
    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        batch_op.add_column(sa.Column('delivery_id', sa.String(length=32), nullable=True))
        batch_op.create_index(batch_op.f('ix_webhook_deliveries_delivery_id'), ['delivery_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_webhook_deliveries_delivery_id'))
        batch_op.drop_column('delivery_id')
    with op.batch_alter_table('webhook_outbox', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_webhook_outbox_task_id'))
        batch_op.drop_index('ix_webhook_outbox_status_id')
    op.drop_table('webhook_outbox')
