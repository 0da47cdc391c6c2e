-- One decision of the reference model (PRODUCT.md) for one (identity, service) key, atomically.
--
-- KEYS[1]  the key, from limiter_key() (a Redis Cluster hash tag, so one slot)
-- ARGV[1]  limit N
-- ARGV[2]  window W, integer microseconds
-- ARGV[3]  "1" when early retries reset the lockout
-- ARGV[4]  now in integer microseconds, or "" to take the store's own clock
--
-- State: one sorted set (docs/capacity.md). Each allowed call is a member scored by its time in
-- integer microseconds; the member "L", scored by locked_until, is the lockout. Integers stay
-- below 2^53, so Lua's doubles hold them exactly. Every step is O(log N) (expired calls are
-- removed once each), so a decision costs the same for a limit of 1 or of 1,000,000.
-- Returns {allowed 0|1, retry_after_us, remaining, reset_after_us, now_us}.

local key = KEYS[1]
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local reset = ARGV[3] == '1'
local now = tonumber(ARGV[4])
if not now then
  -- The store's clock, so replicas whose clocks disagree still decide alike. Redis 5+ replicates
  -- script effects, not the script, so reading TIME before a write is allowed.
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local horizon = now - window

-- Calls at or before the horizon are out of the window for good (a lock that old has ended too).
local dropped = redis.pcall('ZREMRANGEBYSCORE', key, '-inf', string.format('%.0f', horizon))
if type(dropped) == 'table' and dropped.err then
  -- A key in the earlier layout (one string): forgotten once, on the upgrade (docs/capacity.md).
  redis.call('DEL', key)
end
-- A small set (OMS, DRRS: a call and perhaps the lock) is read whole in one call; a large one
-- is read at its two ends only.
local size = redis.call('ZCARD', key)
local whole = nil
local lock = nil
if size <= 4 then
  whole = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  for i = 1, #whole, 2 do
    if whole[i] == 'L' then
      lock = whole[i + 1]
    end
  end
else
  lock = redis.call('ZSCORE', key, 'L')
end
local locked_until = lock and tonumber(lock) or 0
local n = size
if lock then
  n = n - 1
end

-- The oldest (first = true) or newest call's time; "L" is skipped, it is no call.
local function edge(first)
  local got = whole
  if not got then
    got = first and redis.call('ZRANGE', key, 0, 1, 'WITHSCORES')
      or redis.call('ZRANGE', key, -2, -1, 'WITHSCORES')
  end
  local best = nil
  for i = 1, #got, 2 do
    if got[i] ~= 'L' then
      local s = tonumber(got[i + 1])
      if best == nil or (first and s < best) or (not first and s > best) then
        best = s
      end
    end
  end
  return best
end

local allowed, retry_after = 0, 0
if now < locked_until then
  retry_after = locked_until - now
elseif n < limit then
  allowed = 1
  n = n + 1
  -- Scores go as strings: Lua would print a number with 14 digits and lose microseconds.
  -- Members must be unique: a call in the same microsecond as another gets the window's count
  -- as a suffix, which differs for every call allowed at one instant.
  local score = string.format('%.0f', now)
  if redis.call('ZADD', key, 'NX', score, score) == 0 then
    local i = n
    while redis.call('ZADD', key, 'NX', score, score .. '.' .. i) == 0 do
      i = i + 1
    end
  end
else
  retry_after = edge(true) + window - now
end
if allowed == 0 and reset then
  locked_until = now + window
  retry_after = window
  redis.call('ZADD', key, string.format('%.0f', locked_until), 'L')
end

local free_at = locked_until
if allowed == 1 then
  whole = nil -- the set changed: read the newest call from the store
end
if n > 0 then
  local newest = edge(false)
  if newest and newest + window > free_at then
    free_at = newest + window
  end
end
if free_at <= now then
  -- Nothing left that affects a later decision (a lapsed lock, no call in the window).
  if lock then
    redis.call('DEL', key)
  end
elseif allowed == 1 or reset then
  -- A plain rejection changes nothing that a later decision reads, so it writes nothing: the
  -- rejected path (the hot one under abuse) costs no replication or persistence. The key lives
  -- exactly as long as it can affect a decision (rounded up to a millisecond).
  redis.call('PEXPIRE', key, math.ceil((free_at - now) / 1000))
end

local remaining = 0
if now >= locked_until and limit > n then
  remaining = limit - n
end
local reset_after = 0
if free_at > now then
  reset_after = free_at - now
end
return {allowed, retry_after, remaining, reset_after, now}
