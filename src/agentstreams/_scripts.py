"""Server-side scripts: every multi-key change that must be atomic happens in one of these.

All keys a script touches share the stream's hash tag, so they also work on Redis Cluster.
"""

from __future__ import annotations

from typing import Final

#: Move one pending entry to the dead-letter stream and acknowledge it, atomically.
#: KEYS: stream, dlq. ARGV: group, consumer, msg id, field/value pairs...
#: Returns the dead-letter id, or nil when the entry is no longer pending (or is owned by
#: another consumer): someone else already handled it.
DEAD_LETTER: Final = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 then return false end
if p[1][2] ~= ARGV[2] then return false end
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
return id
"""

#: Move one dead letter back to its stream, atomically (the XDEL guard makes a replay race-free).
#: KEYS: dlq, stream. ARGV: dead-letter id, field/value pairs...
REPLAY: Final = """
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return false end
local fields = {}
for i = 2, #ARGV do fields[#fields + 1] = ARGV[i] end
return redis.call('XADD', KEYS[2], '*', unpack(fields))
"""

#: Publish at most once per idempotency key within a window.
#: KEYS: stream, idempotency key. ARGV: window ms, payload digest, n cap args, cap args...,
#: field/value pairs... The key remembers "<id> <digest>" of the first publish.
#: Returns {1, new id} or {0, what the key remembers}.
IDEMPOTENT_XADD: Final = """
local existing = redis.call('GET', KEYS[2])
if existing then return {0, existing} end
local ncap = tonumber(ARGV[3])
local args = {KEYS[1]}
for i = 4, 3 + ncap do args[#args + 1] = ARGV[i] end
args[#args + 1] = '*'
for i = 4 + ncap, #ARGV do args[#args + 1] = ARGV[i] end
local id = redis.call('XADD', unpack(args))
redis.call('SET', KEYS[2], id .. ' ' .. ARGV[2], 'PX', ARGV[1])
return {1, id}
"""



#: Id of the oldest entry that MAXLEN ``n`` keeps, or nil when nothing would be removed.
#: KEYS: stream. ARGV: n. Returns '+' when n is 0 (remove everything).
MAXLEN_CUT_ID: Final = """
local n = tonumber(ARGV[1])
local len = redis.call('XLEN', KEYS[1])
if len <= n then return false end
if n == 0 then return '+' end
local drop = len - n
if drop < n then
  local r = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', drop + 1)
  return r[drop + 1][1]
end
local r = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', n)
return r[n][1]
"""

#: Lease renewal: reset the idle time of entries this consumer still owns, without counting a
#: delivery (XCLAIM ... JUSTID). KEYS: stream. ARGV: group, consumer, ids...
#: Returns the ids that are no longer ours (claimed by another consumer, or acknowledged).
RENEW_LEASES: Final = """
local lost = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p > 0 and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
"""

#: Remove a consumer from its group only if it owns no pending entry (DELCONSUMER would
#: silently drop them). KEYS: stream. ARGV: group, consumer, min idle ms.
#: Returns 1 when removed.
DELETE_IDLE_CONSUMER: Final = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #p > 0 then return 0 end
local consumers = redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
for _, c in ipairs(consumers) do
  local name, idle
  for j = 1, #c, 2 do
    if c[j] == 'name' then name = c[j + 1] end
    if c[j] == 'idle' then idle = c[j + 1] end
  end
  if name == ARGV[2] then
    if idle < tonumber(ARGV[3]) then return 0 end
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
    return 1
  end
end
return 0
"""
