-- traffic.lua: add one process's last second of decisions to the shared counts, and trip
-- each tripwire whose window has reached its threshold, exactly once across every process.
--
-- KEYS[1]  the minute's HASH of decisions: "<action>|<category>" and "rule|<rule>|<category>"
--          -> count (the admin page's chart and its rules that deny most)
-- KEYS[2]  the HASH of disarmed tripwires: name -> who and why, as JSON (read only)
-- then per tripwire, in ARGV order: its counter, a HASH bucket -> count (a bucket is
--          floor(now_ms / window_ms)), then its trip key, a STRING that exists while it is
--          tripped (value "<now_ms>:<count>", PX the trip's duration)
--
-- ARGV[1]  now_ms     '' = read Redis TIME (production); an integer in ms: a test clock
-- ARGV[2]  ttl_ms     how long the minute's HASH lives after this write
-- ARGV[3]  nf         number of (field, count) pairs for KEYS[1] that follow
-- then nf pairs: field, count
-- then     nt         number of tripwires that follow, each:
--   name        its name (the field in KEYS[2])
--   count       its decisions this call adds (at least 1: a wire with none is not sent)
--   threshold   decisions within one window that trip it
--   window_ms   its window
--   duration_ms how long a trip lasts: the trip key's PX
--   blocked     '1' when its flag is on already: it counts, but does not trip
--
-- The window's count is a sliding-window approximation: this bucket's count plus the
-- previous bucket's, weighted by the share of the window still covering it (as counter.lua's
-- sliding counter). A tripwire trips when that count reaches its threshold, it is not
-- disarmed, not blocked, and SET NX of its trip key succeeds: however many processes flush
-- at once, one of them trips it. A trip empties its counter, so counting starts afresh.
--
-- Returns a flat list: per tripwire that tripped in this call, its 1-based index and the
-- count that tripped it.
-- Never: writes KEYS[2]; turns a flag on (the caller does, through the flags HASH); keeps a
-- counter longer than two windows and a second, or a minute's HASH longer than ttl_ms.

local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local nf = tonumber(ARGV[3])
local at = 4
if nf > 0 then
  for i = 0, nf - 1 do
    redis.call('HINCRBY', KEYS[1], ARGV[at + 2 * i], ARGV[at + 2 * i + 1])
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
at = at + 2 * nf

local nt = tonumber(ARGV[at])
at = at + 1
local tripped = {}
for i = 1, nt do
  local name = ARGV[at]
  local count = tonumber(ARGV[at + 1])
  local threshold = tonumber(ARGV[at + 2])
  local window = tonumber(ARGV[at + 3])
  local duration = ARGV[at + 4]
  local blocked = ARGV[at + 5] == '1'
  at = at + 6
  local counter, trip = KEYS[1 + 2 * i], KEYS[2 + 2 * i]
  local bucket = math.floor(now / window)
  local this, before = string.format('%d', bucket), string.format('%d', bucket - 1)
  local current = redis.call('HINCRBY', counter, this, count)
  -- at most three fields ever: this bucket, the previous one, one that has just aged out
  for _, field in ipairs(redis.call('HKEYS', counter)) do
    if tonumber(field) < bucket - 1 then
      redis.call('HDEL', counter, field)
    end
  end
  redis.call('PEXPIRE', counter, 2 * window + 1000)
  local previous = tonumber(redis.call('HGET', counter, before) or '0')
  local left = (window - (now - bucket * window)) / window
  local seen = current + math.floor(previous * left)
  if seen >= threshold and not blocked
      and redis.call('HEXISTS', KEYS[2], name) == 0
      and redis.call('SET', trip, string.format('%d:%d', now, seen), 'NX', 'PX', duration) then
    redis.call('DEL', counter)
    tripped[#tripped + 1] = i
    tripped[#tripped + 1] = seen
  end
end
return tripped
