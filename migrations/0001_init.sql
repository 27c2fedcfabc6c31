-- loopd's shared state, for nodes that run on one Postgres database.

-- Versions of everything the change feed watches: each write takes the next.
CREATE SEQUENCE changes;

-- Small collections shared with the CLI (users, tokens, sessions), one
-- JSON document each, changed whole inside a transaction (row locked).
CREATE TABLE documents (
    name    text PRIMARY KEY,
    body    jsonb NOT NULL,
    version bigint NOT NULL DEFAULT nextval('changes')
);

-- Loop records (what the file backend keeps in loops/<uuid>/meta.json).
CREATE TABLE loops (
    id         uuid PRIMARY KEY,
    created_by text NOT NULL,
    record     jsonb NOT NULL,
    version    bigint NOT NULL DEFAULT nextval('changes')
);
CREATE INDEX loops_by_version ON loops (version);

-- Who runs a loop's agent, with a fencing generation: an append names the
-- generation it was written under, and is refused once another took over.
-- `head` is the loop's last seq (0 before any event).
CREATE TABLE leases (
    loop_id    uuid PRIMARY KEY,
    owner      text,
    generation bigint NOT NULL DEFAULT 0,
    expires_at timestamptz,
    head       bigint NOT NULL DEFAULT 0,
    version    bigint NOT NULL DEFAULT nextval('changes')
);
CREATE INDEX leases_by_version ON leases (version);

-- Every loop's event log: one row per event, the line as the file backend
-- writes it.
CREATE TABLE events (
    loop_id uuid NOT NULL,
    seq     bigint NOT NULL,
    line    text NOT NULL,
    PRIMARY KEY (loop_id, seq)
);

-- The nodes, as they last reported themselves.
CREATE TABLE nodes (
    url        text PRIMARY KEY,
    seen_at    timestamptz NOT NULL,
    owned      integer NOT NULL,
    max_agents integer NOT NULL
);

-- What nodes prove to each other with (made once, by the first node).
CREATE TABLE cluster (
    id     integer PRIMARY KEY CHECK (id = 1),
    secret text NOT NULL
);

-- Login throttles shared by every node: a GCRA's theoretical arrival time.
CREATE TABLE throttles (
    key text PRIMARY KEY,
    tat timestamptz NOT NULL
);
