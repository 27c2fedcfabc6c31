-- The node that last ran a loop's agent: its workspace and the agent's
-- conversation are on that node's disk (unless the workspace root is
-- shared). A loop nobody runs goes back there while that node is alive and
-- has room, so an idle loop does not lose its files by moving.
ALTER TABLE leases ADD COLUMN home text;
