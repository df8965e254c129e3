-- announce.lua: append one change to the change log and publish it, as one step.
--
-- KEYS[1]  the change log: a STREAM named like the channel (pub/sub names and keys are apart)
--
-- ARGV[1]  the change: a JSON object (sync.py's Event, without "id")
-- ARGV[2]  the channel to publish it on
-- ARGV[3]  about how many changes the log keeps (XADD MAXLEN ~)
-- ARGV[4]  how long the log outlives its last change, in ms
--
-- Returns the log entry's id. What is published is ARGV[1] with that id added as "id".
-- Because both happen in one script, every subscriber receives the changes in the log's
-- order: one that has seen entry N live has seen every entry before it (sync.py relies on it).
-- Never: touches another key; publishes anything that is not in the log.

local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'e', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', ARGV[2], '{"id":"' .. id .. '",' .. string.sub(ARGV[1], 2))
return id
