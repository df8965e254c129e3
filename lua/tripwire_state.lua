-- tripwire_state.lua: what each tripwire has counted in its window, and whether it is
-- tripped, on Redis's clock (the one traffic.lua counts by).
--
-- KEYS[1]  the HASH of disarmed tripwires: name -> who and why, as JSON
-- then per tripwire: its counter (a HASH bucket -> count), then its trip key (see traffic.lua)
--
-- ARGV[1]  now_ms     '' = read Redis TIME (production); an integer in ms: a test clock
-- then per tripwire, in KEYS order: window_ms
--
-- Returns {now_ms, then per tripwire: count, trip_pttl_ms (-2: not tripped), then the
-- disarmed HASH as a flat list of name, JSON}.
-- Never: writes anything.

local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local reply = {now}
for i = 1, #ARGV - 1 do
  local window = tonumber(ARGV[1 + i])
  local counter, trip = KEYS[2 * i], KEYS[2 * i + 1]
  local bucket = math.floor(now / window)
  local current = tonumber(redis.call('HGET', counter, string.format('%d', bucket)) or '0')
  local previous = tonumber(redis.call('HGET', counter, string.format('%d', bucket - 1))
                           or '0')
  local left = (window - (now - bucket * window)) / window
  reply[#reply + 1] = current + math.floor(previous * left)
  reply[#reply + 1] = redis.call('PTTL', trip)
end
for _, item in ipairs(redis.call('HGETALL', KEYS[1])) do
  reply[#reply + 1] = item
end
return reply
