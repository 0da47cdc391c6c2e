-- A read-only view of one key, for `explain` and the admin look-up; the same model and the same
-- sorted set as decide.lua (calls scored by their time, "L" scored by locked_until).
--
-- KEYS[1]  the key
-- ARGV[1]  limit N
-- ARGV[2]  window W, integer microseconds
-- ARGV[3]  now in integer microseconds, or "" to take the store's own clock
--
-- Returns {calls_in_window, locked_until_us (0 when not locked), retry_after_us, now_us}.

local key = KEYS[1]
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local after = '(' .. string.format('%.0f', now - window)

local n = redis.pcall('ZCOUNT', key, after, '+inf')
if type(n) == 'table' then
  -- a key in the earlier layout: decide.lua forgets it on its next call
  return {0, 0, 0, now}
end
local lock = redis.call('ZSCORE', key, 'L')
local locked_until = lock and tonumber(lock) or 0
if lock and locked_until > now - window then
  n = n - 1
end

if locked_until <= now then
  locked_until = 0
end
local retry_after = 0
if locked_until > 0 then
  retry_after = locked_until - now
elseif n >= limit and n > 0 then
  local got = redis.call('ZRANGEBYSCORE', key, after, '+inf', 'WITHSCORES', 'LIMIT', 0, 2)
  for i = 1, #got, 2 do
    if got[i] ~= 'L' then
      retry_after = tonumber(got[i + 1]) + window - now
      break
    end
  end
end
return {n, locked_until, retry_after, now}
