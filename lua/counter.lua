-- counter.lua: the sliding-window counter's stored value, read and written alike by
-- check.lua and refund.lua.
--
-- Not a script of its own: Redis scripts cannot load one another, so scripts.read_script
-- sends this file's source before the source of each script that uses it, as one script.
-- It only defines locals: it reads no KEYS or ARGV and calls no Redis command.
--
-- The value is one STRING per rule: "bucket:current:previous,...", one segment per window,
-- in the order of the rule's windows (check.lua's ARGV). bucket is now_ms // window_ms at
-- the segment's last write, current the hits counted in that bucket, previous the hits of
-- the bucket before it. No window length is stored: the bucket number tells a segment's
-- window (windows of different lengths are in buckets far apart), so a window whose
-- segment is not in its place (the rule gained or lost a window since the key was written)
-- finds it by its bucket, and a window with no such segment counts from zero.

-- Library functions as locals, for these functions and the script after them: a global's
-- lookup per use costs more than the arithmetic of a decision.
local tonumber, tostring, type, pcall, error, unpack = tonumber, tostring, type, pcall, error,
                                                     unpack
local find, gmatch, format, concat = string.find, string.gmatch, string.format, table.concat
local floor, ceil, max, min = math.floor, math.ceil, math.max, math.min

-- A number read from text, and one written as text, each converted once per script call
-- (for the script after this file too): a call of many checks meets the same few values
-- again and again (buckets, counts, a log's indexes and hit times), and strtod or "%d" costs
-- more than a table lookup.
local numbers_of, texts_of = {}, {}

local function number_of(text)  -- (nil for nil: a pattern that did not match)
  local number = numbers_of[text]
  if not number and text then
    number = tonumber(text)
    numbers_of[text] = number
  end
  return number
end

local function text_of(number)
  local text = texts_of[number]
  if not text then
    text = format('%d', number)
    texts_of[number] = text
  end
  return text
end

-- The segment of the w-th window that still holds the hits of `bucket`: the one whose
-- bucket is `bucket` (they are its current) or the next (they are its previous). The
-- segment in the window's own place wins; else the first that holds them, in order.
-- Returns its place (1-based), bucket, current and previous as numbers; nil when no
-- segment holds them (raw false or nil: no value), so nothing of that bucket counts.
local function counter_find(raw, w, bucket)
  if not raw then return nil end
  -- its own place: after the (w - 1)-th comma
  local start = 1
  for _ = 2, w do
    start = find(raw, ',', start, true)
    if not start then break end
    start = start + 1
  end
  if start then
    local _, _, b, current, previous = find(raw, '^(%d+):(%d+):(%d+)', start)
    b = number_of(b)
    if b == bucket or b == bucket + 1 then
      return w, b, number_of(current), number_of(previous)
    end
  end
  -- elsewhere: the rule's windows changed since the value was written
  local place = 0
  for b, current, previous in gmatch(raw, '(%d+):(%d+):(%d+)') do
    place = place + 1
    b = number_of(b)
    if b == bucket or b == bucket + 1 then
      return place, b, number_of(current), number_of(previous)
    end
  end
  return nil
end

-- One segment as stored.
local function counter_segment(bucket, current, previous)
  return text_of(bucket) .. ':' .. text_of(current) .. ':' .. text_of(previous)
end

-- The stored value of these segments (as counter_segment formats them), in order.
local function counter_value(segments, count)
  return concat(segments, ',', 1, count or #segments)
end

-- The segments of a stored value, as text, in order.
local function counter_segments(raw)
  local segments = {}
  for segment in gmatch(raw, '%d+:%d+:%d+') do segments[#segments + 1] = segment end
  return segments
end
