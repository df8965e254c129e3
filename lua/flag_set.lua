-- flag_set.lua: write one flag's state, first putting back a snapshot Redis lost.
--
-- KEYS[1]   the flags HASH: flag name -> state JSON
--
-- ARGV[1]   name of the flag to set, or '' to only restore
-- ARGV[2]   its state JSON ('' when ARGV[1] is '')
-- ARGV[3..] name, state JSON pairs: the caller's last known state of every flag an admin
--           ever set; written only when the HASH does not exist although the caller saw it
--           before (Redis lost it: a restart without persistence, a failover to an empty
--           replica), so that no kill switch turns itself off that way
--
-- Returns 1 when the snapshot was restored, else 0.
-- Never: overwrites an existing flag other than ARGV[1]; sets a TTL (flags live until
-- changed, like bans they are exempt from the TTL rule).

local restored = 0
if #ARGV > 2 and redis.call('EXISTS', KEYS[1]) == 0 then
  for i = 3, #ARGV - 1, 2 do
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
  restored = 1
end
if ARGV[1] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
return restored
