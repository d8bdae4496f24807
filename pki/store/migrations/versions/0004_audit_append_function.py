"""PostgreSQL: the audit chain is extended by a server-side function

The client stages each event's canonical JSON around its sequence number (pki/audit.py) and sends one
call with the rest of its transaction's writes. The function locks the chain head, hashes, inserts and
moves the head in the server, so the head's row lock is never held across a round trip. SQLite appends
in Python as before (its writer holds the database lock from BEGIN IMMEDIATE anyway).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 14:40:00
"""
from alembic import op


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


# hash = SHA-256(prev_hash || canonical JSON) in lowercase hex, as pki.audit.chain_hash computes it; the
# canonical JSON is ASCII (json.dumps escapes everything else), so its UTF-8 bytes are its characters.
_FUNCTION = r"""
CREATE OR REPLACE FUNCTION v2gpki_audit_append(
    p_ts timestamptz, p_actor text[], p_org text[], p_action text[], p_object text[], p_outcome text[],
    p_details text[], p_prefix text[], p_suffix text[]
) RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
    v_seq integer;
    v_hash text;
    v_prev text;
    i integer;
BEGIN
    SELECT seq, hash INTO v_seq, v_hash FROM audit_head WHERE id = 1 FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, repeat('0', 64));
        v_seq := 0;
        v_hash := repeat('0', 64);
    END IF;
    FOR i IN 1 .. coalesce(array_length(p_prefix, 1), 0) LOOP
        v_seq := v_seq + 1;
        v_prev := v_hash;
        v_hash := encode(sha256(convert_to(v_prev || p_prefix[i] || v_seq::text || p_suffix[i], 'UTF8')), 'hex');
        INSERT INTO audit_event (seq, ts, actor, org, action, object, outcome, details, prev_hash, hash)
        VALUES (v_seq, p_ts, p_actor[i], p_org[i], p_action[i], p_object[i], p_outcome[i], p_details[i]::json,
                v_prev, v_hash);
    END LOOP;
    UPDATE audit_head SET seq = v_seq, hash = v_hash WHERE id = 1;
END
$fn$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS v2gpki_audit_append(timestamptz, text[], text[], text[], text[], "
                   "text[], text[], text[], text[])")
