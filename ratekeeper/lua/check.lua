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
--               'c' sliding-window counter: a STRING "bucket:current:previous,..." with
--               one segment per window in ARGV order; O(1) memory, approximate (README.md).
--               The bucket number (now_ms // window_ms) also tells which window a segment
--               belongs to, so no window length is stored: a window whose segment is not in
--               its place (the rule gained or lost a window) finds it by its bucket, and a
--               window with no segment of this bucket or the one before counts from zero.
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
-- library functions as locals: a global lookup per use costs more than the arithmetic
local floor, ceil, max, min = math.floor, math.ceil, math.max, math.min
local gmatch, format, concat = string.gmatch, string.format, table.concat

local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
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

-- Every field a table will get is set in its constructor: a table that grows past the size
-- it was made with is rebuilt, which costs more than the rest of the parsing.
local rules = {}
local a, k = 5, nb + 1
for r = 1, nr do
  local rule = {algo = ARGV[a], shadow = ARGV[a + 1] == '1', penalty = tonumber(ARGV[a + 2]),
                key = KEYS[k], windows = {}, max_ms = 0, max_limit = 0, pkey = false,
                denies = false}
  local nw = tonumber(ARGV[a + 3])
  a, k = a + 4, k + 1
  if rule.penalty > 0 then rule.pkey = KEYS[k]; k = k + 1 end
  for w = 1, nw do
    local win = {limit = tonumber(ARGV[a]), ms = tonumber(ARGV[a + 1]), bucket = 0, elapsed = 0,
                 cur = 0, prev = 0, used = 0, oldest = 0, remaining = 0, reset = 0, retry = 0}
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
-- (Plain functions, not a closure per window: a closure per call is garbage per call.)

local function eval_log(rule)
  local key = rule.key
  local len = redis.call('LLEN', key)
  local windows = rule.windows
  for w = 1, #windows do
    local win = windows[w]
    local cutoff = now - win.ms  -- a hit is in the window while its time > cutoff
    -- the list is newest first: binary search for the first hit at or before cutoff
    local lo, hi = 0, min(len, win.limit)
    while lo < hi do
      local mid = floor((lo + hi) / 2)
      if tonumber(redis.call('LINDEX', key, mid)) > cutoff then lo = mid + 1 else hi = mid end
    end
    win.used = lo
    win.oldest = now
    if lo > 0 then win.oldest = tonumber(redis.call('LINDEX', key, lo - 1)) end
  end
end

local function log_wait(key, win, target)
  if win.used <= target then return 0 end
  -- the hit at index `target` (newest first) is the last that must leave
  return tonumber(redis.call('LINDEX', key, target)) + win.ms - now
end

local function counter_wait(win, target)
  local W, e, cur, prev = win.ms, win.elapsed, win.cur, win.prev
  if cur + ceil(prev * (W - e) / W) <= target then return 0 end
  if cur > target then
    -- not before the next bucket, where this bucket decays as the previous one
    return (W - e) + max(0, ceil(W - target * W / cur))
  end
  return max(1, ceil(W - (target - cur) * W / prev) - e)
end

local function eval_counter(rule)
  local raw = redis.call('GET', rule.key)
  local seg, n = {}, 0
  if raw then
    for number in gmatch(raw, '%d+') do
      n = n + 1
      seg[n] = tonumber(number)
    end
  end
  local windows = rule.windows
  for w = 1, #windows do
    local win = windows[w]
    local W = win.ms
    local b = floor(now / W)
    local cur, prev = 0, 0
    local j = 3 * w - 2
    local sb = seg[j]
    if sb ~= b and sb ~= b - 1 then
      -- not in its place: the rule's windows changed since the key was written, so look
      -- for this window's segment among the others (its bucket gives it away)
      sb = nil
      for i = 1, n - 2, 3 do
        if seg[i] == b or seg[i] == b - 1 then j, sb = i, seg[i]; break end
      end
    end
    if sb == b then cur, prev = seg[j + 1], seg[j + 2] elseif sb == b - 1 then prev = seg[j + 1] end
    win.bucket, win.elapsed, win.cur, win.prev = b, now - b * W, cur, prev
    -- the previous bucket is assumed spread evenly: the part of it still inside the window
    win.used = cur + ceil(prev * (W - win.elapsed) / W)
  end
end

local function wait_for(rule, win, target)
  if rule.algo == 'l' then return log_wait(rule.key, win, target) end
  return counter_wait(win, target)
end

local function finish(rule, win)
  win.remaining = max(0, win.limit - win.used)
  win.reset = 0
  if win.used > 0 then win.reset = wait_for(rule, win, win.used - 1) end
  win.retry = 0
  if win.remaining < want then
    if want > win.limit then
      win.retry = win.ms
    else
      win.retry = wait_for(rule, win, win.limit - want)
    end
  end
end

local denied, shadowed, wait = false, false, 0
for r = 1, nr do
  local rule = rules[r]
  if rule.algo == 'l' then eval_log(rule) else eval_counter(rule) end
  rule.denies = false
  local windows = rule.windows
  for w = 1, #windows do
    finish(rule, windows[w])
    if windows[w].retry > 0 then rule.denies = true end
  end
  if rule.denies then
    if rule.shadow then
      shadowed = true
    else
      denied = true
      for w = 1, #windows do
        if windows[w].retry > wait then wait = windows[w].retry end
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
        local left = min(cost, rule.max_limit)
        while left > 0 do
          local n = min(left, CHUNK)
          local batch = {}
          for i = 1, n do batch[i] = now end
          redis.call('LPUSH', rule.key, unpack(batch))
          left = left - n
        end
        redis.call('LTRIM', rule.key, 0, rule.max_limit - 1)
        redis.call('PEXPIRE', rule.key, rule.max_ms + SLACK_MS)
        local windows = rule.windows
        for w = 1, #windows do
          local win = windows[w]
          -- the oldest hit still counted leaves first (now, if the window was empty)
          win.remaining = win.remaining - cost
          win.reset = win.oldest + win.ms - now
        end
      else
        local parts = {}
        local windows = rule.windows
        for w = 1, #windows do
          local win = windows[w]
          win.cur = win.cur + cost
          win.used = win.used + cost
          -- integer formatting: a number concatenated as text goes through "%.14g"
          parts[w] = format('%d:%d:%d', win.bucket, win.cur, win.prev)
          win.remaining = win.remaining - cost
          win.reset = counter_wait(win, win.used - 1)
        end
        redis.call('SET', rule.key, concat(parts, ','), 'PX', rule.max_ms + SLACK_MS)
      end
    end
  end
end

local shadow_flag = 0
if shadowed then shadow_flag = 1 end
local out = {status, now, shadow_flag, 0, wait}
local o = 5
for r = 1, nr do
  local windows = rules[r].windows
  for w = 1, #windows do
    local win = windows[w]
    out[o + 1], out[o + 2], out[o + 3] = win.remaining, win.reset, win.retry
    o = o + 3
  end
end
return out
