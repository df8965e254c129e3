-- refund.lua: give back hits that check.lua took at a known time.
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
-- never below zero). Refunding twice is the caller's to prevent (see service.refund).

local cost = tonumber(ARGV[1])
local at = tonumber(ARGV[2])
local nr = tonumber(ARGV[3])
local out = {}
local a = 4
for r = 1, nr do
  local key, algo, nw = KEYS[r], ARGV[a], tonumber(ARGV[a + 1])
  a = a + 2
  local windows = {}
  for w = 1, nw do windows[w] = ARGV[a]; a = a + 1 end
  local given = 0
  if algo == 'l' then
    given = redis.call('LREM', key, cost, at)
  else
    local raw = redis.call('GET', key)
    if raw then
      local parts = {}
      for seg in string.gmatch(raw, '[^|]+') do
        local w, b, c, p = string.match(seg, '^(%d+):(%d+):(%d+):(%d+)$')
        if w then
          b, c, p = tonumber(b), tonumber(c), tonumber(p)
          local at_bucket = math.floor(at / tonumber(w))
          local take = 0
          if b == at_bucket then
            take = math.min(cost, c); c = c - take
          elseif b == at_bucket + 1 then
            take = math.min(cost, p); p = p - take
          end
          if take > given then given = take end
          parts[#parts + 1] = w .. ':' .. b .. ':' .. c .. ':' .. p
        end
      end
      redis.call('SET', key, table.concat(parts, '|'), 'KEEPTTL')
    end
  end
  out[r] = given
end
return out
