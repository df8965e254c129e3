"""How the Lua sources are put together, and counter.lua's functions run on a real
redis-server: check.lua and refund.lua are sent with counter.lua before them, and the
counter's segments are found by their bucket and written back as they were read."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis

from ratekeeper.storage.scripts import Scripts, read_script

SHARED = ("check", "refund")
ALONE = ("announce", "flag_set", "flag_expire")

# counter_find's answer for ARGV: raw ('' with ARGV[4] = 'absent': no value), w, bucket
FIND = """
local raw = ARGV[1]
if ARGV[4] == 'absent' then raw = false end
local place, bucket, current, previous = counter_find(raw, tonumber(ARGV[2]), tonumber(ARGV[3]))
if not place then return false end
return {place, bucket, current, previous}
"""

# the value rewritten from its segments, and segment 1 replaced by counter_segment(ARGV[2..4])
REWRITE = """
local segments = counter_segments(ARGV[1])
local same = counter_value(segments)
segments[1] = counter_segment(tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]))
return {same, counter_value(segments), #segments}
"""


def test_shared_scripts_are_counter_lua_then_their_own_file() -> None:
    """check.lua and refund.lua are sent as counter.lua's source followed by their own
    file, which opens with its own header."""
    counter = read_script("counter")
    assert counter.startswith("-- counter.lua:")
    for name in SHARED:
        source = read_script(name)
        assert source.startswith(counter)
        assert source[len(counter):].startswith(f"-- {name}.lua:")


def test_other_scripts_are_sent_alone() -> None:
    """The scripts that do not touch the counter are sent as their own file only."""
    counter = read_script("counter")
    for name in ALONE:
        source = read_script(name)
        assert source.startswith(f"-- {name}.lua:")
        assert counter not in source


async def test_each_scripts_sha_is_the_one_redis_gives_its_source(
        redis: aioredis.Redis) -> None:
    """The SHA the limiter sends with EVALSHA is the one Redis computes for the source it
    is given with EVAL (the combined source, for the shared scripts)."""
    scripts = Scripts.register(redis)
    for script in scripts.all:
        assert script.script == read_script(script.name)
        assert await redis.script_load(script.script) == script.sha


async def counter_find(redis: aioredis.Redis, raw: str | None, w: int,
                       bucket: int) -> Any:
    """counter_find run by Redis: [place, bucket, current, previous] or None."""
    return await redis.eval(read_script("counter") + FIND, 0, raw or "", w, bucket,
                            "absent" if raw is None else "present")


@pytest.mark.parametrize(("raw", "w", "bucket", "found"), [
    # in its own place: this bucket's hits are its current; the next bucket's segment
    # holds them as its previous
    ("10:3:1,2:5:0", 1, 10, [1, 10, 3, 1]),
    ("10:3:1,2:5:0", 1, 9, [1, 10, 3, 1]),
    ("10:3:1,2:5:0", 2, 2, [2, 2, 5, 0]),
    # not in its place (the rule gained or lost a window): found by its bucket
    ("10:3:1,2:5:0", 1, 2, [2, 2, 5, 0]),
    ("10:3:1", 3, 10, [1, 10, 3, 1]),
    # two segments hold the bucket: the one in the window's own place wins
    ("7:1:0,7:2:0", 2, 7, [2, 7, 2, 0]),
    ("7:1:0,8:2:0", 1, 7, [1, 7, 1, 0]),
    # no segment holds it, or there is no value: nothing of that bucket counts
    ("10:3:1,2:5:0", 1, 11, None),
    ("10:3:1,2:5:0", 1, 8, None),
    ("", 1, 10, None),
    (None, 1, 10, None),
])
async def test_a_windows_segment_is_found_by_its_bucket(
        redis: aioredis.Redis, raw: str | None, w: int, bucket: int, found: Any) -> None:
    """counter_find answers the segment that still holds a bucket's hits: its own place
    first, then the first segment that holds them, else none."""
    assert await counter_find(redis, raw, w, bucket) == found


async def test_segments_are_written_back_as_they_were_read(redis: aioredis.Redis) -> None:
    """A value split into its segments and joined again is the same value; a segment
    formatted by counter_segment takes its place without touching the others."""
    raw = "472224:3:1,19676:9:4,1700000000:0:2"
    same, changed, count = await redis.eval(read_script("counter") + REWRITE, 0, raw,
                                            472224, 2, 1)
    assert same.decode() == raw
    assert changed.decode() == "472224:2:1,19676:9:4,1700000000:0:2"
    assert count == 3
