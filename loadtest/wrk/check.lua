-- wrk script for the bench: POST /v1/check (or /v1/check/batch) with client IPs drawn at
-- random from a pool, so every request is a fresh decision on a mostly cold subject.
--
-- wrk ... -s check.lua URL -- MODE POOL [EXTRA...]
--   single POOL                     one check per request
--   batch  POOL SIZE                SIZE checks per request to /v1/check/batch
--   flood  POOL FLOOD_N FLOOD_PCT   FLOOD_PCT% of requests from FLOOD_N flood subjects
-- Pool IP i is 198.18.0.0 + i (RFC 2544's benchmarking range, 131,072 addresses);
-- flood subject j is pool IP POOL + j. They are data in a JSON body, never an address
-- that anything is sent to.
--
-- Every answer is read: answers saying "degraded":true (Redis was not asked in time) and
-- "allowed":true are counted, so a figure bought with fail-open answers shows up. The
-- ceiling is driven by this same script, so both pay for the reading. done() prints one
-- line "WRKJSON {...}" for bench.py.

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

local mode, pool, batch, flood_n, flood_pct
local headers = {["Content-Type"] = "application/json"}
degraded, allowed, decisions = 0, 0, 0

local function ip(i)
  return "198." .. (18 + math.floor(i / 65536)) .. "." .. (math.floor(i / 256) % 256) .. "." .. (i % 256)
end

local function one(i)
  return '{"action":"check","ip":"' .. ip(i) .. '"}'
end

function init(args)
  mode = args[1] or "single"
  pool = tonumber(args[2] or "100000")
  batch = tonumber(args[3] or "100")
  flood_n = tonumber(args[3] or "300")
  flood_pct = tonumber(args[4] or "95")
  math.randomseed(os.time() * 1000 + (tid or 0) * 7919)
end

function request()
  if mode == "batch" then
    local parts = {}
    for j = 1, batch do parts[j] = one(math.random(0, pool - 1)) end
    return wrk.format("POST", "/v1/check/batch", headers,
                      '{"checks":[' .. table.concat(parts, ",") .. ']}')
  end
  local i
  if mode == "flood" and math.random() * 100 < flood_pct then
    i = pool + math.random(0, flood_n - 1)
  else
    i = math.random(0, pool - 1)
  end
  return wrk.format("POST", "/v1/check", headers, one(i))
end

local function count(body, needle)
  local n, at = 0, 1
  while true do
    local found = string.find(body, needle, at, true)
    if not found then return n end
    n, at = n + 1, found + #needle
  end
end

function response(status, headers, body)
  if mode == "batch" then
    decisions = decisions + batch
  else
    decisions = decisions + 1
  end
  degraded = degraded + count(body, '"degraded":true')
  allowed = allowed + count(body, '"allowed":true')
end

function done(summary, latency, requests)
  local d, a, n = 0, 0, 0
  for _, thread in ipairs(threads) do
    d = d + thread:get("degraded")
    a = a + thread:get("allowed")
    n = n + thread:get("decisions")
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f,' ..
    '"max_us":%d,"decisions":%d,"degraded":%d,"allowed":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(99), latency.mean, latency.max,
    n, d, a))
end
