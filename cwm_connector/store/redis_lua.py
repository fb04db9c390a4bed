"""The Lua scripts of the Redis tier: each touches only keys of one hash-tag slot.

A script runs atomically on the node that owns its keys, so every pair a script
changes together (a blob and its pin counter, a block map and its pins, a
manifest and the window index) shares one hash tag: `{<digest hex>}`,
`{<hash hex>}` or `{windows}`. TTLs are in milliseconds (`redis_ttl_s` may be a
fraction of a second in tests).
"""

from __future__ import annotations

# KEYS: blob, blob pins. ARGV: blob bytes, ttl ms. Returns 1 if written, 0 if present.
# A present blob keeps its bytes (content-addressed) and, if it is cache, its TTL restarts;
# a new blob that windows already pin (the pin came first) gets no TTL.
PUT_BLOB = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2], 'XX')
  return 0
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('SET', KEYS[1], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
"""

# KEYS: block map, its pins. ARGV: digest, ttl ms. Returns 1 if written.
# A pinned map is left alone: it names a digest some window pins.
PUT_BLOCK = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: blob, blob pins. Returns 1 if the blob is present (now without TTL), 0 if absent.
PIN_BLOB = """
redis.call('INCR', KEYS[2])
redis.call('PERSIST', KEYS[1])
return redis.call('EXISTS', KEYS[1])
"""

# KEYS: blob, blob pins. Returns 1 if no window pins the blob any more (then it is gone).
UNPIN_BLOB = """
if redis.call('DECR', KEYS[2]) > 0 then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""

# KEYS: block map, its pins (a hash: digest -> windows pinning the map at that digest).
# ARGV: digest. The map now names this digest, without TTL. Returns 1.
PIN_BLOCK = """
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""

# KEYS: block map, its pins. ARGV: digest. Returns 1 if the map is gone (no pins left).
# Two windows may map one hash to different digests (KV from two servers need not be
# bit-equal): while pins remain, the map names a digest that one of them still pins.
UNPIN_BLOCK = """
if redis.call('HINCRBY', KEYS[2], ARGV[1], -1) <= 0 then redis.call('HDEL', KEYS[2], ARGV[1]) end
local left = redis.call('HKEYS', KEYS[2])
if #left == 0 then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 1
end
local current = redis.call('GET', KEYS[1])
if not current or redis.call('HEXISTS', KEYS[2], current) == 0 then
  redis.call('SET', KEYS[1], left[1])
end
return 0
"""

# KEYS: manifest, index. ARGV: manifest, name, "1" to replace.
# Returns 0 if the name is taken (and not replace), 1 if claimed, or the replaced manifest.
CLAIM_WINDOW = """
local old = redis.call('GET', KEYS[1])
if old and ARGV[3] ~= '1' then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
if old then return old end
return 1
"""

# KEYS: manifest, index. ARGV: name. Returns the removed manifest, or nil.
POP_WINDOW = """
local old = redis.call('GET', KEYS[1])
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return old
"""

# KEYS: block map. ARGV: the value it had when found orphaned. Deletes it only if unchanged
# (a capture may have remapped it since `gc` looked). Returns 1 if deleted.
DEL_IF_EQUAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: a blob or block map, its pins. ARGV: ttl ms. `gc`'s repair of one key, atomic
# against pins: unpinned without TTL gets one (1), pinned with a TTL loses it (2); else 0.
GC_KEY = """
local pinned = redis.call('EXISTS', KEYS[2]) == 1
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -2 then return 0 end
if pinned and ttl >= 0 then
  redis.call('PERSIST', KEYS[1])
  return 2
end
if not pinned and ttl == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  return 1
end
return 0
"""
