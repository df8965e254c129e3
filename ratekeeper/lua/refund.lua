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
      -- segments are "bucket:current:previous", one per window in ARGV order (check.lua);
      -- a window finds its own by its bucket when the rule's windows have changed since
      local seg = {}
      for n in string.gmatch(raw, '%d+') do seg[#seg + 1] = tonumber(n) end
      for w = 1, nw do
        local at_bucket = math.floor(at / tonumber(windows[w]))
        local function here(i)
          return seg[i] == at_bucket or seg[i] == at_bucket + 1
        end
        local j = 3 * w - 2
        if not here(j) then
          j = nil
          for i = 1, #seg, 3 do
            if here(i) then j = i; break end
          end
        end
        if j then
          local take
          if seg[j] == at_bucket then
            take = math.min(cost, seg[j + 1]); seg[j + 1] = seg[j + 1] - take
          else  -- the bucket has moved on: the hits are in "previous" now
            take = math.min(cost, seg[j + 2]); seg[j + 2] = seg[j + 2] - take
          end
          if take > given then given = take end
        end
      end
      local parts = {}
      for i = 1, #seg - 2, 3 do
        parts[#parts + 1] = string.format('%d:%d:%d', seg[i], seg[i + 1], seg[i + 2])
      end
      redis.call('SET', key, table.concat(parts, ','), 'KEEPTTL')
    end
  end
  out[r] = given
end
return out
