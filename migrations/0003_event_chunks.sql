-- A loop's events as chunks: one row per append (a flush of the loop's
-- log), its lines joined by newlines, numbered first_seq..=last_seq. A row
-- per event made the database's own insert cost the limit of a busy node;
-- a row per flush costs one insert for many events.
CREATE TABLE event_chunks (
    loop_id   uuid NOT NULL,
    first_seq bigint NOT NULL,
    last_seq  bigint NOT NULL CHECK (last_seq >= first_seq),
    lines     text NOT NULL,
    PRIMARY KEY (loop_id, first_seq)
);

INSERT INTO event_chunks (loop_id, first_seq, last_seq, lines)
    SELECT loop_id, seq, seq, line FROM events;

DROP TABLE events;
