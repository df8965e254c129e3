-- refund.lua: give back hits that check.lua took at a known time.
--
-- This script is sent with counter.lua before it (scripts.read_script joins the two into one
-- script): counter_segments, counter_find, counter_segment and counter_value come from there,
-- and the library functions as locals (floor, min, max, ...).
--
-- KEYS[1 .. nr]  per rule, in ARGV order: its state key (as passed to check.lua)
--
-- ARGV[1]  cost    hits to give back, integer >= 1
-- ARGV[2]  at_ms   the now_ms check.lua returned when it took them
-- ARGV[3]  nr      number of rules
-- then, per rule:
--   algorithm  'l' | 'c' (as in check.lua)
--   nw         number of windows, then nw window lengths in ms (the limits are not needed)
--
-- Returns the number of hits given back per rule, as a list of nr integers.
-- Never: creates a key, changes a TTL, or gives back more than was taken at at_ms (a log
-- removes only entries stamped at_ms; a counter only decrements the bucket at_ms fell in,
-- never below zero). Refunding twice is the caller's to prevent (see Checker.refund).

local cost = tonumber(ARGV[1])
local at = tonumber(ARGV[2])
local nr = tonumber(ARGV[3])

-- Give back up to `cost` hits of the counter in `key`; how many one window gave back at
-- most. Every segment is written back, those of windows no longer configured too.
local function refund_counter(key, windows_ms)
  local raw = redis.call('GET', key)
  if not raw then return 0 end
  local segments = counter_segments(raw)
  local given = 0
  for w, ms in ipairs(windows_ms) do
    local bucket = floor(at / ms)
    local place, found, current, previous = counter_find(raw, w, bucket)
    if place then
      local take
      if found == bucket then
        take = min(cost, current)
        current = current - take
      else  -- the bucket has moved on: the hits are in "previous" now
        take = min(cost, previous)
        previous = previous - take
      end
      segments[place] = counter_segment(found, current, previous)
      raw = counter_value(segments)  -- the next window finds what this one left
      given = max(given, take)
    end
  end
  redis.call('SET', key, raw, 'KEEPTTL')
  return given
end

local out = {}
local a = 4
for r = 1, nr do
  local key, algorithm, nw = KEYS[r], ARGV[a], tonumber(ARGV[a + 1])
  local windows_ms = {}
  for w = 1, nw do windows_ms[w] = tonumber(ARGV[a + 1 + w]) end
  a = a + 2 + nw
  if algorithm == 'l' then
    out[r] = redis.call('LREM', key, cost, at)
  else
    out[r] = refund_counter(key, windows_ms)
  end
end
return out
