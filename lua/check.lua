-- check.lua: decide n requests, one after another, each against every window of every rule
-- of its action, all or nothing.
--
-- This script is sent with counter.lua before it (scripts.read_script joins the two into one
-- script): counter_find, counter_segment and counter_value come from there, the library
-- functions as locals (find, format, floor, ...), and number_of and text_of.
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
--               one segment per window in ARGV order; O(1) memory, approximate (lua/README.md).
--               A window finds its segment by its bucket (counter.lua), so a rule that
--               gains or loses a window keeps the other windows' counts.
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
--   remaining hits left after this request
--   reset_ms  until remaining next goes up (0 when nothing is counted), at most the window:
--             a true sliding window lets every hit counted now go within one window; a
--             counter, which spreads its previous bucket evenly, can lag behind that by up
--             to window / current after a burst early in a bucket, and that lag is not
--             reported (RateLimit's reset is read against the policy's window)
--   retry_ms  until this cost would pass (0 when it passes now); a counter's may exceed the
--             window, as its estimate must fall that far before it admits
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
-- reads a key of another type as absent (identity/keys.py gives each algorithm its own key
-- name, so a counter key is a STRING or nothing, and only SET writes ban and penalty keys).

local SLACK_MS = 1000
local CHUNK = 1000  -- hits per LPUSH: a large cost never builds an unbounded argument list

local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
end
local n, s = tonumber(ARGV[2]), tonumber(ARGV[3])

-- An error's message: redis.call raises a table on some versions.
local function message(err)
  if type(err) == 'table' and err.err then return err.err end
  return tostring(err)
end

-- A rule set is parsed once per call, however many requests use it:
--   nkeys    how many KEYS its rules take per request (state keys and penalty keys)
--   error    false, or the message every request of the set is answered with
--   rules    its rules, in ARGV order
-- A rule:
--   algorithm     'l' or 'c'
--   shadow        true: evaluated and reported, never denies, never boxes
--   penalty_ms    as sent (text); '0' = no penalty
--   state_key     its state key's offset among the request's rule keys
--   penalty_key   its penalty key's offset, or false (no penalty)
--   penalty_read  where its enforced penalty key is in the request's MGET, or false (no
--                 penalty, or a shadow rule, which never boxes)
--   counter_read  where its counter is in the request's MGET, or false (a log)
--   windows       its windows, in ARGV order
--   max_limit     its largest limit: a log keeps that many hits
--   ttl_ms        the TTL it writes on its state key: longest window + SLACK_MS (text)
--   trim_stop     a log's LTRIM stop: max_limit - 1 (text)
--   denies        whether it denies the request being decided
-- A window: limit (hits) and ms, then what deciding the current request found:
--   used          hits counted now
--   oldest        a log's oldest hit still counted (now when none is)
--   remaining, reset_ms, retry_ms   its answer, as the header says
--   segment       a counter's segment to write when the cost is taken (counter.lua)
--   taken_reset_ms  a counter's reset_ms once the cost is taken
-- Numbers go to redis.call as text made once per call (a rule's TTL and LTRIM stop, a log's
-- indexes): Redis formats a Lua number with "%.17g", which costs more than the arithmetic
-- of a decision.
local function parse_set(a, last)
  local set = {nkeys = 0, error = false, rules = {}}
  local nreads = 0  -- the rules' part of a request's MGET (its bans come first)
  while a < last do
    local algorithm, shadow = ARGV[a], ARGV[a + 1] == '1'
    local penalty, nw = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
    if algorithm ~= 'l' and algorithm ~= 'c' then
      error('check.lua: unknown algorithm ' .. tostring(algorithm), 0)
    end
    set.nkeys = set.nkeys + 1
    local rule = {algorithm = algorithm, shadow = shadow, penalty_ms = ARGV[a + 2],
                  state_key = set.nkeys, penalty_key = false, penalty_read = false,
                  counter_read = false, windows = {}, max_limit = 0, ttl_ms = '',
                  trim_stop = '', denies = false}
    if penalty > 0 then
      set.nkeys = set.nkeys + 1
      rule.penalty_key = set.nkeys
      if not shadow then
        nreads = nreads + 1
        rule.penalty_read = nreads
      end
    end
    if algorithm == 'c' then
      nreads = nreads + 1
      rule.counter_read = nreads
    end
    a = a + 4
    local max_ms = 0
    for w = 1, nw do
      local limit, ms = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
      rule.windows[w] = {limit = limit, ms = ms, used = 0, oldest = 0, remaining = 0,
                         reset_ms = 0, retry_ms = 0, segment = '', taken_reset_ms = 0}
      if ms > max_ms then max_ms = ms end
      if limit > rule.max_limit then rule.max_limit = limit end
      a = a + 2
    end
    rule.ttl_ms = format('%d', max_ms + SLACK_MS)
    rule.trim_stop = format('%d', rule.max_limit - 1)
    set.rules[#set.rules + 1] = rule
  end
  if a ~= last then error('check.lua: a rule set is not as long as its na', 0) end
  return set
end

local sets = {}
local a = 4
for i = 1, s do
  local na = tonumber(ARGV[a])
  if not na then break end
  local ok, set = pcall(parse_set, a + 1, a + 1 + na)
  if not ok then set = {nkeys = 0, error = message(set), rules = {}} end
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

-- Scratch lists, reused by every request of the call (a table per request costs more than
-- the arithmetic of a decision): what a request MGETs, the hits a log pushes, a counter's
-- segments and a request's answers per window.
local reads, hits, segments, answers = {}, {}, {}, {}
local NOTHING = {}

-- Per window, every algorithm knows `used` (hits counted now) and wait(target), the ms
-- until used <= target if nothing more is taken. remaining = limit - used;
-- retry = wait(limit - want); reset = wait(used - 1), the time until one more hit fits, at
-- most the window (see the header).
-- Each sets its windows' answers and returns true when a window cannot take `want`.

local function log_hit(key, i)  -- the time of the i-th hit, newest first, from 0
  return number_of(redis.call('LINDEX', key, text_of(i)))
end

local function log_wait(key, window, target)
  if window.used <= target then return 0 end
  -- the hit at index `target` is the last that must leave
  return log_hit(key, target) + window.ms - now
end

local function log_rule(rule, key, want)
  local denies = false
  local len = redis.call('LLEN', key)
  for w = 1, #rule.windows do
    local window = rule.windows[w]
    local cutoff = now - window.ms  -- a hit is in the window while its time > cutoff
    -- the list is newest first: binary search for the first hit at or before cutoff
    local lo, hi = 0, min(len, window.limit)
    while lo < hi do
      local mid = floor((lo + hi) / 2)
      if log_hit(key, mid) > cutoff then lo = mid + 1 else hi = mid end
    end
    window.used = lo
    -- the oldest hit still counted leaves first (now, if the window is empty)
    window.oldest = now
    if lo > 0 then window.oldest = log_hit(key, lo - 1) end
    window.remaining, window.reset_ms, window.retry_ms = max(0, window.limit - lo), 0, 0
    if lo > 0 then window.reset_ms = log_wait(key, window, lo - 1) end
    if window.remaining < want then
      if want > window.limit then
        window.retry_ms = window.ms
      else
        window.retry_ms = log_wait(key, window, window.limit - want)
      end
      if window.retry_ms > 0 then denies = true end
    end
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
local function counter_rule(rule, raw, cost, want)
  local denies = false
  for w = 1, #rule.windows do
    local window = rule.windows[w]
    local W = window.ms
    local bucket = floor(now / W)
    -- the segment that still holds the previous bucket's hits, if any: this bucket's
    -- (current and previous), or the previous bucket's (its current is now the previous)
    local cur, prev = 0, 0
    local _, found, current, previous = counter_find(raw, w, bucket - 1)
    if found == bucket then
      cur, prev = current, previous
    elseif found then
      prev = current
    end
    local e = now - bucket * W
    -- the previous bucket is assumed spread evenly: the part of it still inside the window
    local used = cur + ceil(prev * (W - e) / W)
    window.used = used
    window.remaining, window.reset_ms, window.retry_ms = max(0, window.limit - used), 0, 0
    if used > 0 then window.reset_ms = min(W, counter_wait(W, e, cur, prev, used - 1)) end
    if window.remaining < want then
      if want > window.limit then
        window.retry_ms = W
      else
        window.retry_ms = counter_wait(W, e, cur, prev, window.limit - want)
      end
      if window.retry_ms > 0 then denies = true end
    end
    if cost > 0 then
      window.segment = counter_segment(bucket, cur + cost, prev)
      window.taken_reset_ms = min(W, counter_wait(W, e, cur + cost, prev, used + cost - 1))
    end
  end
  return denies
end

-- Take the cost for a rule that allowed it: its hits or counts, and its windows' answers.
local function take(rule, key, cost)
  local windows = rule.windows
  if rule.algorithm == 'l' then
    local left = min(cost, rule.max_limit)  -- a log keeps max_limit hits at most
    local stamp = text_of(now)
    for i = 1, min(left, CHUNK) do hits[i] = stamp end
    while left > 0 do
      local chunk = min(left, CHUNK)
      redis.call('LPUSH', key, unpack(hits, 1, chunk))
      left = left - chunk
    end
    redis.call('LTRIM', key, '0', rule.trim_stop)
    redis.call('PEXPIRE', key, rule.ttl_ms)
    for w = 1, #windows do
      local window = windows[w]
      window.remaining = window.remaining - cost
      window.reset_ms = window.oldest + window.ms - now
    end
  else
    for w = 1, #windows do
      local window = windows[w]
      segments[w] = window.segment
      window.remaining = window.remaining - cost
      window.reset_ms = window.taken_reset_ms
    end
    -- PSETEX, not SET .. PX: Redis 7.0 reuses a redis.call argument object of an earlier
    -- call at the same position when it is large enough, and keeps a short string in the
    -- object it was given. The MGET before left its keys at positions 1 and 2, so a value
    -- in position 2 would be stored with a key's room (16 B more per subject); position 3
    -- only holds a key when the MGET read 3 keys or more.
    redis.call('PSETEX', key, rule.ttl_ms, counter_value(segments, #windows))
  end
end

-- One request: k is the index in KEYS of the key before its first.
local function decide(cost, nk, set, k)
  if set.error then error(set.error, 0) end
  local rules = set.rules
  -- a peek (cost 0) asks whether one more hit would pass
  local want = cost
  if want == 0 then want = 1 end
  local nb = nk - set.nkeys  -- its ban keys
  if nb < 0 then error('check.lua: a request has fewer KEYS than its rules', 0) end
  local rk = k + nb  -- KEYS[rk + i] is the i-th key of the request's rules

  -- one MGET: the bans, then per rule its enforced penalty key and its counter
  local m = nb
  for i = 1, nb do reads[i] = KEYS[k + i] end
  for r = 1, #rules do
    local rule = rules[r]
    if rule.penalty_read then
      m = m + 1
      reads[nb + rule.penalty_read] = KEYS[rk + rule.penalty_key]
    end
    if rule.counter_read then
      m = m + 1
      reads[nb + rule.counter_read] = KEYS[rk + rule.state_key]
    end
  end
  local values = NOTHING  -- (read only where a rule or ban key was put in the MGET)
  if m > 0 then values = redis.call('MGET', unpack(reads, 1, m)) end
  for i = 1, nb do
    if values[i] then return {2, now, 0, i, redis.call('PTTL', KEYS[k + i])} end
  end
  for r = 1, #rules do
    local rule = rules[r]
    if rule.penalty_read and values[nb + rule.penalty_read] then
      return {3, now, 0, r, redis.call('PTTL', KEYS[rk + rule.penalty_key])}
    end
  end

  local denied, shadowed, wait = false, false, 0
  for r = 1, #rules do
    local rule = rules[r]
    if rule.algorithm == 'l' then
      rule.denies = log_rule(rule, KEYS[rk + rule.state_key], want)
    else
      rule.denies = counter_rule(rule, values[nb + rule.counter_read], cost, want)
    end
    if rule.denies and rule.shadow then
      shadowed = true
    elseif rule.denies then
      denied = true
      for w = 1, #rule.windows do wait = max(wait, rule.windows[w].retry_ms) end
    end
  end

  if cost > 0 then
    for r = 1, #rules do
      local rule = rules[r]
      if denied then
        -- only the enforced rules that denied box the subject
        if rule.penalty_key and rule.denies and not rule.shadow then
          redis.call('SET', KEYS[rk + rule.penalty_key], '1', 'PX', rule.penalty_ms)
        end
      elseif not rule.denies then
        -- a shadow rule that would deny counts as if it had been enforced: it takes nothing
        take(rule, KEYS[rk + rule.state_key], cost)
      end
    end
  end

  local o = 0
  for r = 1, #rules do
    local windows = rules[r].windows
    for w = 1, #windows do
      local window = windows[w]
      answers[o + 1], answers[o + 2], answers[o + 3] =
        window.remaining, window.reset_ms, window.retry_ms
      o = o + 3
    end
  end
  -- built at its final size: a table that grows is reallocated at every power of two
  return {denied and 0 or 1, now, shadowed and 1 or 0, 0, wait, unpack(answers, 1, o)}
end

local replies = {}
local k = 0
for i = 1, n do
  local cost, nk, set = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), sets[tonumber(ARGV[a + 2])]
  local ok, reply
  if set then
    ok, reply = pcall(decide, cost, nk, set, k)
    if not ok then
      -- a request's error is its own answer, except READONLY: this node is a replica
      -- (nothing can have been written by anyone here), and the client must see it as the
      -- call's error to find the new master
      reply = message(reply)
      if find(reply, 'READONLY', 1, true) == 1 then return redis.error_reply(reply) end
    end
  else
    reply = 'check.lua: no rule set ' .. tostring(ARGV[a + 2])
  end
  replies[i] = reply
  a, k = a + 3, k + nk
end
return replies
