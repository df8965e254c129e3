-- check.lua: decide one request against every window of every rule, all or nothing.
--
-- KEYS[1 .. nb]   ban keys: one per subject of the request; a present key means banned
-- KEYS[nb+1 ..]   per rule, in ARGV order: its state key, then its penalty key when the
--                 rule has a penalty
--
-- ARGV[1]  now_ms      '' = read Redis TIME (production); an integer in ms: a test clock, or
--                       on a Cluster the TIME the request's first slot read (every slot of a
--                       request stamps one now, so one now_ms refunds all of it)
-- ARGV[2]  cost        hits to take, integer >= 0; 0 only looks ("would one more hit pass?")
-- ARGV[3]  nb          number of ban keys
-- ARGV[4]  nr          number of rules
-- then, per rule:
--   algorithm   'l' sliding log: a LIST of hit times in ms, newest first, trimmed to the
--               largest limit; exact
--               'c' sliding-window counter: a STRING "window_ms:bucket:current:previous|..."
--               one segment per window; O(1) memory, approximate (see README.md)
--   shadow      '1' = evaluate and report, never deny, never box
--   penalty_ms  0 = none; else how long a subject that exceeds the rule stays boxed
--   nw          number of windows, then nw pairs: limit (hits), window (ms)
--
-- Returns {status, now_ms, shadowed, index, wait_ms, then for every window of every rule in
--          ARGV order: remaining, reset_ms, retry_ms}
--   status    1 allowed (and taken), 0 rate limited, 2 banned, 3 in a penalty box
--   shadowed  1 when a shadow rule would have denied
--   index     status 2: which ban key (1-based); status 3: which rule (1-based); else 0
--   wait_ms   status 2/3: PTTL of that key (-1 = no expiry); status 0: the longest retry_ms
--   remaining hits left after this request; reset_ms: until remaining next goes up (0 when
--             nothing is counted); retry_ms: until this cost would pass (0 when it passes now)
--
-- Never: writes when status ~= 1, except the penalty key of a non-shadow rule that denied a
-- request with cost > 0; touches a key not passed in KEYS; leaves a written key without a
-- TTL (state keys live window + SLACK_MS after their last write, which is also how long a
-- hit can matter: once the newest hit is older than the window, the true count is zero).

local SLACK_MS = 1000
local CHUNK = 1000

local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local cost = tonumber(ARGV[2])
local nb = tonumber(ARGV[3])
local nr = tonumber(ARGV[4])
-- a peek (cost 0) asks whether one more hit would pass
local want = cost
if want == 0 then want = 1 end

for i = 1, nb do
  local ttl = redis.call('PTTL', KEYS[i])
  if ttl ~= -2 then return {2, now, 0, i, ttl} end
end

local rules = {}
local a, k = 5, nb + 1
for r = 1, nr do
  local rule = {algo = ARGV[a], shadow = ARGV[a + 1] == '1', penalty = tonumber(ARGV[a + 2]),
                key = KEYS[k], windows = {}, max_ms = 0, max_limit = 0}
  local nw = tonumber(ARGV[a + 3])
  a, k = a + 4, k + 1
  if rule.penalty > 0 then rule.pkey = KEYS[k]; k = k + 1 end
  for w = 1, nw do
    local win = {limit = tonumber(ARGV[a]), ms = tonumber(ARGV[a + 1]), ms_text = ARGV[a + 1]}
    rule.windows[w] = win
    if win.ms > rule.max_ms then rule.max_ms = win.ms end
    if win.limit > rule.max_limit then rule.max_limit = win.limit end
    a = a + 2
  end
  rules[r] = rule
end

for r = 1, nr do
  local rule = rules[r]
  if rule.pkey and not rule.shadow then
    local ttl = redis.call('PTTL', rule.pkey)
    if ttl ~= -2 then return {3, now, 0, r, ttl} end
  end
end

-- Each algorithm answers, per window: `used` (hits counted now) and wait(target), the ms
-- until used <= target if nothing more is taken. remaining = limit - used;
-- retry = wait(limit - want); reset = wait(used - 1), the time until one more hit fits.

local function eval_log(rule)
  local key = rule.key
  local len = redis.call('LLEN', key)
  for _, win in ipairs(rule.windows) do
    local cutoff = now - win.ms  -- a hit is in the window while its time > cutoff
    -- the list is newest first: binary search for the first hit at or before cutoff
    local lo, hi = 0, math.min(len, win.limit)
    while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      if tonumber(redis.call('LINDEX', key, mid)) > cutoff then lo = mid + 1 else hi = mid end
    end
    win.used = lo
    win.oldest = now
    if lo > 0 then win.oldest = tonumber(redis.call('LINDEX', key, lo - 1)) end
    win.wait = function(target)
      if win.used <= target then return 0 end
      -- the hit at index `target` (newest first) is the last that must leave
      return tonumber(redis.call('LINDEX', key, target)) + win.ms - now
    end
  end
end

local function counter_wait(win, target)
  local W, e, cur, prev = win.ms, win.elapsed, win.cur, win.prev
  if cur + math.ceil(prev * (W - e) / W) <= target then return 0 end
  if cur > target then
    -- not before the next bucket, where this bucket decays as the previous one
    return (W - e) + math.max(0, math.ceil(W - target * W / cur))
  end
  return math.max(1, math.ceil(W - (target - cur) * W / prev) - e)
end

local function eval_counter(rule)
  local raw = redis.call('GET', rule.key)
  local state = {}
  if raw then
    for w, b, c, p in string.gmatch(raw, '(%d+):(%d+):(%d+):(%d+)') do
      state[w] = {tonumber(b), tonumber(c), tonumber(p)}
    end
  end
  for _, win in ipairs(rule.windows) do
    local W = win.ms
    local b = math.floor(now / W)
    local cur, prev = 0, 0
    local s = state[win.ms_text]
    if s then
      if s[1] == b then cur, prev = s[2], s[3] elseif s[1] == b - 1 then prev = s[2] end
    end
    win.bucket, win.elapsed, win.cur, win.prev = b, now - b * W, cur, prev
    -- the previous bucket is assumed spread evenly: the part of it still inside the window
    win.used = cur + math.ceil(prev * (W - win.elapsed) / W)
    win.wait = function(target) return counter_wait(win, target) end
  end
end

local function finish(win)
  win.remaining = math.max(0, win.limit - win.used)
  win.reset = 0
  if win.used > 0 then win.reset = win.wait(win.used - 1) end
  win.retry = 0
  if win.remaining < want then
    if want > win.limit then win.retry = win.ms else win.retry = win.wait(win.limit - want) end
  end
end

local denied, shadowed, wait = false, false, 0
for r = 1, nr do
  local rule = rules[r]
  if rule.algo == 'l' then eval_log(rule) else eval_counter(rule) end
  rule.denies = false
  for _, win in ipairs(rule.windows) do
    finish(win)
    if win.retry > 0 then rule.denies = true end
  end
  if rule.denies then
    if rule.shadow then
      shadowed = true
    else
      denied = true
      for _, win in ipairs(rule.windows) do
        if win.retry > wait then wait = win.retry end
      end
    end
  end
end

local status = 1
if denied then
  status = 0
  if cost > 0 then
    for r = 1, nr do
      local rule = rules[r]
      if rule.pkey and rule.denies and not rule.shadow then
        redis.call('SET', rule.pkey, '1', 'PX', rule.penalty)
      end
    end
  end
elseif cost > 0 then
  for r = 1, nr do
    local rule = rules[r]
    -- a shadow rule that would deny counts as if it had been enforced: it takes nothing
    if not rule.denies then
      if rule.algo == 'l' then
        local left = math.min(cost, rule.max_limit)
        while left > 0 do
          local n = math.min(left, CHUNK)
          local batch = {}
          for i = 1, n do batch[i] = now end
          redis.call('LPUSH', rule.key, unpack(batch))
          left = left - n
        end
        redis.call('LTRIM', rule.key, 0, rule.max_limit - 1)
        redis.call('PEXPIRE', rule.key, rule.max_ms + SLACK_MS)
        for _, win in ipairs(rule.windows) do
          -- the oldest hit still counted leaves first (now, if the window was empty)
          win.remaining = win.remaining - cost
          win.reset = win.oldest + win.ms - now
        end
      else
        local parts = {}
        for i, win in ipairs(rule.windows) do
          win.cur = win.cur + cost
          win.used = win.used + cost
          parts[i] = win.ms_text .. ':' .. win.bucket .. ':' .. win.cur .. ':' .. win.prev
          win.remaining = win.remaining - cost
          win.reset = counter_wait(win, win.used - 1)
        end
        redis.call('SET', rule.key, table.concat(parts, '|'), 'PX', rule.max_ms + SLACK_MS)
      end
    end
  end
end

local shadow_flag = 0
if shadowed then shadow_flag = 1 end
local out = {status, now, shadow_flag, 0, wait}
for r = 1, nr do
  for _, win in ipairs(rules[r].windows) do
    out[#out + 1] = win.remaining
    out[#out + 1] = win.reset
    out[#out + 1] = win.retry
  end
end
return out
