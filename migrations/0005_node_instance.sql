-- Which process last reported itself under a node's advertise URL: a
-- random id each loopd makes at start. Another id showing up under the
-- same URL while this one runs means two processes share one name.
ALTER TABLE nodes ADD COLUMN instance text;
