"""Result cache: the result_cache table (one row per cached result, keyed by the sha256 of its key's
components; see matcalc.cache).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('result_cache',
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('property', sa.String(length=64), nullable=False),
    sa.Column('model', sa.String(length=128), nullable=False),
    sa.Column('structure_hash', sa.String(length=64), nullable=False),
    sa.Column('cache_version', sa.Integer(), nullable=False),
    sa.Column('key_data', sa.JSON(), nullable=False),
    sa.Column('result', sa.Text(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('hits', sa.Integer(), nullable=False),
    sa.Column('last_hit_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('key')
    )
    with op.batch_alter_table('result_cache', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_result_cache_model'), ['model'], unique=False)
        batch_op.create_index(batch_op.f('ix_result_cache_property'), ['property'], unique=False)
        batch_op.create_index(batch_op.f('ix_result_cache_structure_hash'), ['structure_hash'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('result_cache', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_result_cache_structure_hash'))
        batch_op.drop_index(batch_op.f('ix_result_cache_property'))
        batch_op.drop_index(batch_op.f('ix_result_cache_model'))
    op.drop_table('result_cache')
