-- The audit trail: who did what, append-only (never updated or deleted by loopd).
CREATE TABLE audit (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL,
    user_name text NOT NULL,
    entry jsonb NOT NULL
);
CREATE INDEX audit_by_user ON audit (user_name, id);
CREATE INDEX audit_by_time ON audit (at);
