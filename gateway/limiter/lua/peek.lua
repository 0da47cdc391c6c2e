-- A read-only view of one key, for `explain` and the admin look-up; the same model as decide.lua.
--
-- KEYS[1]  the key
-- ARGV[1]  limit N
-- ARGV[2]  window W, integer microseconds
-- ARGV[3]  now in integer microseconds, or "" to take the store's own clock
--
-- Returns {calls_in_window, locked_until_us (0 when not locked), retry_after_us, now_us}.

local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local locked_until, oldest, n = 0, nil, 0
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
      oldest = oldest or t
    end
  end
end

if locked_until <= now then
  locked_until = 0
end
local retry_after = 0
if locked_until > 0 then
  retry_after = locked_until - now
elseif n >= limit then
  retry_after = oldest + window - now
end
return {n, locked_until, retry_after, now}
