-- check.lua: decide n requests, one after another, each against every window of every rule
-- of its action, all or nothing.
--
-- KEYS     the requests' keys, concatenated in request order; per request: its ban keys (one
--          per subject of the request; a present key means banned), then per rule of its rule
--          set, in order: the rule's state key, then its penalty key when the rule has one.
--          On a Cluster a call's keys must share one slot: the limiter sends a call of one
--          request per slot there (the coalescer only runs on a single Redis)
--
-- ARGV[1]  now_ms      '' = read Redis TIME, once for the whole call (production); an integer
--                       in ms: a test clock, or on a Cluster the TIME the request's first slot
--                       read (every slot of a request stamps one now, so one now_ms refunds
--                       all of it)
-- ARGV[2]  n           number of requests
-- ARGV[3]  s           number of rule sets: the rules of an action, sent once per call however
--                       many of its requests use them
-- then s rule sets, each:
--   na          number of its arguments that follow; then per rule:
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
-- then n requests, each:
--   cost        hits to take, integer >= 0; 0 only looks ("would one more hit pass?")
--   nk          number of its KEYS: its ban keys, plus 1 per rule of its set, plus 1 per
--               rule with a penalty (so a request whose set is malformed can still be
--               skipped)
--   set         its rule set, 1-based
--
-- Returns one reply per request, in request order. A request's reply is
--          {status, now_ms, shadowed, index, wait_ms, then for every window of every rule in
--          ARGV order: remaining, reset_ms, retry_ms}
--   status    1 allowed (and taken), 0 rate limited, 2 banned, 3 in a penalty box
--   shadowed  1 when a shadow rule would have denied
--   index     status 2: which ban key of the request (1-based); status 3: which rule
--             (1-based); else 0
--   wait_ms   status 2/3: PTTL of that key (-1 = no expiry); status 0: the longest retry_ms
--   remaining hits left after this request; reset_ms: until remaining next goes up (0 when
--             nothing is counted); retry_ms: until this cost would pass (0 when it passes now)
-- or, when deciding that request raised an error (a key of another type, a malformed rule
-- set), the error's message as a string; the other requests are decided as usual. The whole
-- call fails, before anything is written, when its counts (n, s, na, nk) do not add up to
-- its KEYS and ARGV; and with READONLY when a request's write meets a replica (nothing can
-- have been written there), so that the client reconnects to the master.
--
-- Requests are decided in order, so a request sees what the ones before it wrote: n requests
-- in one call answer exactly as n calls of one request each, sent in the same order.
--
-- Never: writes for a request whose status ~= 1, except the penalty key of a non-shadow rule
-- that denied a request with cost > 0; touches a key not passed in KEYS; leaves a written key
-- without a TTL (state keys live window + SLACK_MS after their last write, which is also how
-- long a hit can matter: once the newest hit is older than the window, the true count is
-- zero).
--
-- A request's ban keys, enforced penalty keys and counter keys are read with one MGET, which
-- reads a key of another type as absent (keys.py gives each algorithm its own key name, so a
-- counter key is a STRING or nothing, and only SET writes ban and penalty keys).

local SLACK_MS = 1000
local CHUNK = 1000
-- library functions as locals: a global lookup per use costs more than the arithmetic
local floor, ceil, max, min = math.floor, math.ceil, math.max, math.min
local find, gmatch, format = string.find, string.gmatch, string.format
local tonumber, tostring, type, pcall, unpack, error = tonumber, tostring, type, pcall, unpack,
                                                     error

local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
end
local n, s = tonumber(ARGV[2]), tonumber(ARGV[3])

-- (nums[x] or num(x)) reads a number from text, (texts[v] or text(v)) writes one as text:
-- strtod, and "%.14g" for a number concatenated or passed to redis.call, cost more than the
-- arithmetic of a decision. A call of many requests meets the same few values again and
-- again (buckets, counts, list indexes) and converts each once; a call of one request
-- converts directly, as a cache would only cost it.
local nums, texts = {}, {}
local num, text = tonumber, function(v) return format('%d', v) end
if n > 1 then
  num = function(x)
    local v = tonumber(x)
    if v then nums[x] = v end
    return v
  end
  text = function(v)
    local x = format('%d', v)
    texts[v] = x
    return x
  end
end

-- Zeros to build a table with all its slots at once, as {..., unpack(zeros, 1, size)}:
-- a table that grows is reallocated at every power of two.
local zeros, nzeros = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, 16
local function enough_zeros(size)
  while nzeros < size do
    nzeros = nzeros + 1
    zeros[nzeros] = 0
  end
end

-- A rule set, parsed once per call: {nkeys, size, error, nr, rule 1, .., rule nr}: how many
-- KEYS its rules take, the length of a request's reply, its error (false when it parsed),
-- then its rules. A rule is one table:
--   [1] algorithm, [2] shadow (boolean), [3] penalty_ms (text), [4] its state key's offset,
--   [5] its penalty key's offset (false: no penalty), [6] its MGET slot for its enforced
--   penalty key and [7] for its counter (false: none), [8] nw, [9] its largest limit,
--   [10] the TTL to write and [11] the LTRIM stop (text), [12] whether it denies the request
--   being decided; then 6 slots per window from 12 + 6 * (w - 1): limit, ms, then for the
--   request being decided: used and oldest (log), the segment to write and reset_ms once
--   the cost is taken (counter).
local function parse_set(a, last)
  local set = {0, 5, false, 0, false, false, false, false}
  local nkeys, nreads, size, nr = 0, 0, 5, 0
  while a < last do
    local algo, shadow, penalty, nw = ARGV[a], ARGV[a + 1] == '1', tonumber(ARGV[a + 2]),
                                      tonumber(ARGV[a + 3])
    if algo ~= 'l' and algo ~= 'c' then
      error('check.lua: unknown algorithm ' .. tostring(algo), 0)
    end
    nkeys = nkeys + 1
    enough_zeros(6 * nw)
    local rule = {algo, shadow, ARGV[a + 2], nkeys, false, false, false, nw, 0, '', '', false,
                  unpack(zeros, 1, 6 * nw)}
    -- a request MGETs its bans, then per rule its enforced penalty key and its counter
    if penalty > 0 then
      nkeys = nkeys + 1
      rule[5] = nkeys
      if not shadow then
        nreads = nreads + 1
        rule[6] = nreads
      end
    end
    if algo == 'c' then
      nreads = nreads + 1
      rule[7] = nreads
    end
    a = a + 4
    local max_ms, max_limit = 0, 0
    for w = 13, 12 + 6 * nw, 6 do
      local limit, ms = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
      rule[w], rule[w + 1] = limit, ms
      if ms > max_ms then max_ms = ms end
      if limit > max_limit then max_limit = limit end
      a = a + 2
    end
    rule[9], rule[10], rule[11] = max_limit, format('%d', max_ms + SLACK_MS),
                                  format('%d', max_limit - 1)
    nr = nr + 1
    set[4 + nr] = rule
    size = size + 3 * nw
  end
  if a ~= last then error('check.lua: a rule set is not as long as its na', 0) end
  enough_zeros(size)
  set[1], set[2], set[4] = nkeys, size, nr
  return set
end

local sets = {}
local a = 4
for i = 1, s do
  local na = tonumber(ARGV[a])
  if not na then break end
  local ok, set = pcall(parse_set, a + 1, a + 1 + na)
  if not ok then
    -- redis.call raises a table on some versions
    if type(set) == 'table' and set.err then set = set.err end
    set = {0, 5, tostring(set), 0}
  end
  sets[i] = set
  a = a + 1 + na
end
-- Every count must add up before anything is decided: past a wrong one, no request could
-- be found, and a call that fails half-way would have taken hits for nobody.
do
  local k = 0
  for i = 0, n - 1 do
    local nk = tonumber(ARGV[a + 3 * i + 1])
    if not nk then break end
    k = k + nk
  end
  if #sets ~= s or #ARGV ~= a + 3 * n - 1 or k ~= #KEYS then
    error('check.lua: n, s, na and nk do not add up to KEYS and ARGV')
  end
end

local reads = {}  -- a request's MGET arguments
local hits, nhits = {}, 0  -- LPUSH arguments: every hit of a call is stamped now

-- Per window, every algorithm knows `used` (hits counted now) and wait(target), the ms
-- until used <= target if nothing more is taken. remaining = limit - used;
-- retry = wait(limit - want); reset = wait(used - 1), the time until one more hit fits.
-- A rule's answers go to out[o + 1 ..]; it returns true when a window cannot take `want`.

local function log_wait(key, rule, w, target)
  if rule[w + 2] <= target then return 0 end
  -- the hit at index `target` (newest first) is the last that must leave
  local at = redis.call('LINDEX', key, texts[target] or text(target))
  return (nums[at] or num(at)) + rule[w + 1] - now
end

local function log_rule(rule, key, want, out, o)
  local denies = false
  local len = redis.call('LLEN', key)
  for w = 13, 12 + 6 * rule[8], 6 do
    local limit, ms = rule[w], rule[w + 1]
    local cutoff = now - ms  -- a hit is in the window while its time > cutoff
    -- the list is newest first: binary search for the first hit at or before cutoff
    local lo, hi = 0, min(len, limit)
    while lo < hi do
      local mid = floor((lo + hi) / 2)
      local at = redis.call('LINDEX', key, texts[mid] or text(mid))
      if (nums[at] or num(at)) > cutoff then lo = mid + 1 else hi = mid end
    end
    -- the oldest hit still counted leaves first (now, if the window is empty)
    local oldest = now
    if lo > 0 then
      local at = redis.call('LINDEX', key, texts[lo - 1] or text(lo - 1))
      oldest = nums[at] or num(at)
    end
    rule[w + 2], rule[w + 3] = lo, oldest
    local remaining, reset, retry = max(0, limit - lo), 0, 0
    if lo > 0 then reset = log_wait(key, rule, w, lo - 1) end
    if remaining < want then
      if want > limit then retry = ms else retry = log_wait(key, rule, w, limit - want) end
      if retry > 0 then denies = true end
    end
    out[o + 1], out[o + 2], out[o + 3] = remaining, reset, retry
    o = o + 3
  end
  return denies
end

-- The sliding counter of a window of W ms, e ms into the current bucket, whose current and
-- previous buckets hold cur and prev hits.
local function counter_wait(W, e, cur, prev, target)
  if cur + ceil(prev * (W - e) / W) <= target then return 0 end
  if cur > target then
    -- not before the next bucket, where this bucket decays as the previous one
    return (W - e) + max(0, ceil(W - target * W / cur))
  end
  return max(1, ceil(W - (target - cur) * W / prev) - e)
end

-- raw: the rule's STRING (false when absent). With cost > 0 it also keeps, per window, what
-- taking the cost would write and answer, so an allowed request only writes.
local function counter_rule(rule, raw, cost, want, out, o)
  local denies = false
  local pos = 1  -- where the next segment in its place starts; nil once the value is not
  for w = 13, 12 + 6 * rule[8], 6 do
    local limit, W = rule[w], rule[w + 1]
    local bucket = floor(now / W)
    local cur, prev = 0, 0
    if raw then
      local sb, x, y
      if pos then
        local i, j, z
        i, j, z, x, y = find(raw, '^(%d+):(%d+):(%d+)', pos)
        if i then sb, pos = nums[z] or num(z), j + 2 else pos = nil end
      end
      if sb ~= bucket and sb ~= bucket - 1 then
        -- not in its place: the rule's windows changed since the key was written, so look
        -- for this window's segment among the others (its bucket gives it away)
        sb = nil
        for z, y1, y2 in gmatch(raw, '(%d+):(%d+):(%d+)') do
          local v = nums[z] or num(z)
          if v == bucket or v == bucket - 1 then sb, x, y = v, y1, y2; break end
        end
      end
      if sb == bucket then
        cur, prev = nums[x] or num(x), nums[y] or num(y)
      elseif sb == bucket - 1 then
        prev = nums[x] or num(x)
      end
    end
    local e = now - bucket * W
    -- the previous bucket is assumed spread evenly: the part of it still inside the window
    local used = cur + ceil(prev * (W - e) / W)
    local remaining, reset, retry = limit - used, 0, 0
    if remaining < 0 then remaining = 0 end
    if used > 0 then reset = counter_wait(W, e, cur, prev, used - 1) end
    if remaining < want then
      if want > limit then retry = W else retry = counter_wait(W, e, cur, prev, limit - want) end
      if retry > 0 then denies = true end
    end
    out[o + 1], out[o + 2], out[o + 3] = remaining, reset, retry
    o = o + 3
    if cost > 0 then
      local taken = cur + cost
      if n > 1 then
        rule[w + 4] = (texts[bucket] or text(bucket)) .. ':' .. (texts[taken] or text(taken)) ..
                      ':' .. (texts[prev] or text(prev))
      else
        rule[w + 4] = format('%d:%d:%d', bucket, taken, prev)
      end
      rule[w + 5] = counter_wait(W, e, taken, prev, used + cost - 1)
    end
  end
  return denies
end

-- One request: k is the index in KEYS of the key before its first.
local function decide(cost, nk, set, k)
  if set[3] then error(set[3], 0) end
  -- a peek (cost 0) asks whether one more hit would pass
  local want = cost
  if want == 0 then want = 1 end
  local nb = nk - set[1]
  if nb < 0 then error('check.lua: a request has fewer KEYS than its rules', 0) end
  local rk = k + nb  -- KEYS[rk + i] is the i-th key of the request's rules
  local nr = set[4]

  local m = 0  -- MGET: the bans, then per rule its enforced penalty key and its counter
  for i = 1, nb do
    m = m + 1
    reads[m] = KEYS[k + i]
  end
  for r = 5, 4 + nr do
    local rule = set[r]
    if rule[6] then
      m = m + 1
      reads[m] = KEYS[rk + rule[5]]
    end
    if rule[7] then
      m = m + 1
      reads[m] = KEYS[rk + rule[4]]
    end
  end
  local values = false
  if m > 0 then values = redis.call('MGET', unpack(reads, 1, m)) end
  for i = 1, nb do
    if values[i] then return {2, now, 0, i, redis.call('PTTL', KEYS[k + i])} end
  end
  for r = 1, nr do
    local rule = set[4 + r]
    if rule[6] and values[nb + rule[6]] then
      return {3, now, 0, r, redis.call('PTTL', KEYS[rk + rule[5]])}
    end
  end

  local out = {unpack(zeros, 1, set[2])}
  local denied, shadowed, wait = false, false, 0
  local o = 5
  for r = 5, 4 + nr do
    local rule = set[r]
    local denies
    if rule[1] == 'l' then
      denies = log_rule(rule, KEYS[rk + rule[4]], want, out, o)
    else
      denies = counter_rule(rule, values[nb + rule[7]], cost, want, out, o)
    end
    local last = o + 3 * rule[8]
    rule[12] = denies
    if denies then
      if rule[2] then
        shadowed = true
      else
        denied = true
        for i = o + 3, last, 3 do
          if out[i] > wait then wait = out[i] end
        end
      end
    end
    o = last
  end

  if denied then
    out[1] = 0
    if cost > 0 then
      for r = 5, 4 + nr do
        local rule = set[r]
        if rule[5] and rule[12] and not rule[2] then
          redis.call('SET', KEYS[rk + rule[5]], '1', 'PX', rule[3])
        end
      end
    end
  else
    out[1] = 1
    if cost > 0 then
      o = 5
      for r = 5, 4 + nr do
        local rule = set[r]
        local last = 12 + 6 * rule[8]
        local key = KEYS[rk + rule[4]]
        -- a shadow rule that would deny counts as if it had been enforced: it takes nothing
        if rule[12] then
          o = o + 3 * rule[8]
        elseif rule[1] == 'l' then
          local left = min(cost, rule[9])
          while nhits < min(left, CHUNK) do
            nhits = nhits + 1
            hits[nhits] = texts[now] or text(now)
          end
          while left > 0 do
            local chunk = min(left, CHUNK)
            redis.call('LPUSH', key, unpack(hits, 1, chunk))
            left = left - chunk
          end
          redis.call('LTRIM', key, '0', rule[11])
          redis.call('PEXPIRE', key, rule[10])
          for w = 13, last, 6 do
            out[o + 1] = out[o + 1] - cost
            out[o + 2] = rule[w + 3] + rule[w + 1] - now
            o = o + 3
          end
        else
          local value = rule[17]
          for w = 13, last, 6 do
            if w > 13 then value = value .. ',' .. rule[w + 4] end
            out[o + 1] = out[o + 1] - cost
            out[o + 2] = rule[w + 5]
            o = o + 3
          end
          -- PSETEX, not SET .. PX: Redis 7.0 reuses a redis.call argument object of an
          -- earlier call at the same position when it is large enough, and keeps a short
          -- string in the object it was given. The MGET before left its keys at positions
          -- 1 and 2, so a value in position 2 would be stored with a key's room (16 B more
          -- per subject); position 3 only holds a key when the MGET read 3 keys or more.
          redis.call('PSETEX', key, rule[10], value)
        end
      end
    end
  end
  out[2] = now
  if shadowed then out[3] = 1 end
  out[5] = wait
  return out
end

local replies = {}
local k = 0
for i = 1, n do
  local cost, nk, set = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), sets[tonumber(ARGV[a + 2])]
  local ok, reply
  if set then
    ok, reply = pcall(decide, cost, nk, set, k)
    if not ok then
      -- a request's error is its own answer; redis.call raises a table on some versions
      if type(reply) == 'table' and reply.err then reply = reply.err end
      reply = tostring(reply)
      -- except READONLY: this node is a replica (nothing can have been written by anyone
      -- here), and the client must see it as the call's error to find the new master
      if find(reply, 'READONLY', 1, true) == 1 then return redis.error_reply(reply) end
    end
  else
    reply = 'check.lua: no rule set ' .. tostring(ARGV[a + 2])
  end
  replies[i] = reply
  a, k = a + 3, k + nk
end
return replies
