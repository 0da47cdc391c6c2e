-- The violation ledger's writes (gateway/ops/ledger.py StreamSink): one call writes a batch.
--
-- KEYS[1]  the hash of open episodes (episode id -> JSON)
-- KEYS[2]  the sorted set of identities with streams, scored by their last write (ms)
-- ARGV[1]  retention, milliseconds
-- ARGV[2]  the per-identity bound on final episodes
-- ARGV[3]  the stream key prefix (the identity follows it)
-- then per entry, four ARGV: kind ("o" open, "f" final), episode id, identity, JSON
--
-- Returns {identity, evicted, ...} for the identities whose bound dropped episodes.
-- Times are the store's own (TIME), as in decide.lua.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local retention = tonumber(ARGV[1])
local bound = tonumber(ARGV[2])
local minid = now_ms - retention
local evicted = {}
for i = 4, #ARGV, 4 do
  local kind, id, who, e = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if kind == 'o' then
    redis.call('HSET', KEYS[1], id, e)
  else
    local s = ARGV[3] .. who
    redis.call('XADD', s, '*', 'e', e)
    redis.call('HDEL', KEYS[1], id)
    redis.call('ZADD', KEYS[2], now_ms, who)
    redis.call('XTRIM', s, 'MINID', minid)
    local dropped = redis.call('XTRIM', s, 'MAXLEN', bound)
    if dropped > 0 then
      evicted[who] = (evicted[who] or 0) + dropped
    end
    redis.call('PEXPIRE', s, retention)
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', minid)
local out = {}
for who, n in pairs(evicted) do
  out[#out + 1] = who
  out[#out + 1] = n
end
return out
