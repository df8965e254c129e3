-- flag_expire.lua: turn off a flag whose expiry has passed, once, whoever notices first.
--
-- KEYS[1]  the flags HASH: flag name -> state JSON
--
-- ARGV[1]  the flag's name
-- ARGV[2]  the state JSON it must still hold (the enabled state that expired)
-- ARGV[3]  the state JSON to write instead (disabled)
--
-- Returns 1 when this call turned it off (so the caller, and only it, records the expiry
-- in the audit trail), 0 when the flag no longer holds ARGV[2] (changed or already expired).
-- Never: touches another flag; sets a TTL.

if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
