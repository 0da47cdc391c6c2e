-- One decision of the reference model (PRODUCT.md) for one (identity, service) key, atomically.
--
-- KEYS[1]  the key, from limiter_key() (a Redis Cluster hash tag, so one slot)
-- ARGV[1]  limit N
-- ARGV[2]  window W, integer microseconds
-- ARGV[3]  "1" when early retries reset the lockout
-- ARGV[4]  now in integer microseconds, or "" to take the store's own clock
--
-- State: one string "locked_until t1 t2 ...", integer microseconds, oldest call first. Integers
-- stay below 2^53, so Lua's doubles hold them exactly and no float drift creeps in.
-- Returns {allowed 0|1, retry_after_us, remaining, reset_after_us, now_us}.

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

local locked_until, calls, n = 0, {}, 0
local state = redis.call('GET', KEYS[1])
if state then
  local horizon = now - window
  local first = true
  for v in string.gmatch(state, '-?%d+') do
    local t = tonumber(v)
    if first then
      locked_until, first = t, false
    elseif t > horizon then
      n = n + 1
      calls[n] = t
    end
  end
end

local allowed, retry_after = 0, 0
if now < locked_until then
  retry_after = locked_until - now
elseif n < limit then
  allowed = 1
  n = n + 1
  calls[n] = now
else
  retry_after = calls[1] + window - now
end
if allowed == 0 and reset then
  locked_until = now + window
  retry_after = window
end

local free_at = locked_until
if n > 0 and calls[n] + window > free_at then
  free_at = calls[n] + window
end
-- A plain rejection changes nothing that a later decision reads, so it writes nothing: the
-- rejected path (the hot one under abuse) costs no replication or persistence.
if (allowed == 1 or reset) and free_at > now then
  local parts = {string.format('%.0f', locked_until > now and locked_until or 0)}
  for i = 1, n do
    parts[i + 1] = string.format('%.0f', calls[i])
  end
  -- The key lives exactly as long as it can affect a decision (rounded up to a millisecond).
  redis.call('SET', KEYS[1], table.concat(parts, ' '), 'PX', math.ceil((free_at - now) / 1000))
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
