-- Merge what a replica's local fallback decided during a store outage into one key, atomically,
-- on the store's clock (docs/outage.md). The key is decide.lua's sorted set (calls scored by
-- their time, "L" scored by locked_until).
--
-- KEYS[1]  the key, from limiter_key()
-- ARGV[1]  limit N
-- ARGV[2]  window W, integer microseconds
-- ARGV[3]  the local lockout's time left, integer microseconds (0: not locked)
-- ARGV[4..] the ages of the calls the fallback allowed, integer microseconds before now
--
-- The replica sends ages, not times, so its clock never meets the store's: each call is placed
-- at (store now - age). Returns {excess, calls merged, now_us}: `excess` is how many calls, of
-- the store's and the merged ones still in the window, the store would have rejected had it
-- decided them all in time order.

local key = KEYS[1]
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local lock_left = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local horizon = now - window

local locked_until, calls = 0, {}
local held = redis.pcall('ZRANGEBYSCORE', key, '(' .. string.format('%.0f', horizon), '+inf',
  'WITHSCORES')
if type(held) == 'table' and held.err then
  held = {} -- a key in the earlier layout: replaced below
end
for i = 1, #held, 2 do
  if held[i] == 'L' then
    locked_until = tonumber(held[i + 1])
  else
    calls[#calls + 1] = tonumber(held[i + 1])
  end
end
local merged = 0
for i = 4, #ARGV do
  local x = now - tonumber(ARGV[i])
  if x > horizon then
    calls[#calls + 1] = x
    merged = merged + 1
  end
end
table.sort(calls)

-- The store's decisions replayed over every call: those it would have refused are the excess.
-- Admitted calls are in time order, so the window's start only moves forward (one pass).
local admitted, first, excess = {}, 1, 0
for _, x in ipairs(calls) do
  while first <= #admitted and admitted[first] <= x - window do
    first = first + 1
  end
  if #admitted - first + 1 < limit then
    admitted[#admitted + 1] = x
  else
    excess = excess + 1
  end
end

if lock_left > 0 and now + lock_left > locked_until then
  locked_until = now + lock_left
end
-- Keep the newest N calls: a later call is admitted only once fewer than N calls are in its
-- window, and the older calls dropped here leave the window before the kept ones do.
local first_kept = math.max(1, #calls - limit + 1)
local free_at = locked_until
if #calls > 0 and calls[#calls] + window > free_at then
  free_at = calls[#calls] + window
end
redis.call('DEL', key)
if free_at > now then
  local batch = {}
  local function flush()
    if #batch > 0 then
      redis.call('ZADD', key, unpack(batch))
      batch = {}
    end
  end
  if locked_until > now then
    batch[1], batch[2] = string.format('%.0f', locked_until), 'L'
  end
  for i = first_kept, #calls do
    -- Unique members: the time, and the call's place when two share a microsecond.
    batch[#batch + 1] = string.format('%.0f', calls[i])
    batch[#batch + 1] = string.format('%.0f.r%d', calls[i], i)
    if #batch >= 1000 then
      flush()
    end
  end
  flush()
  redis.call('PEXPIRE', key, math.ceil((free_at - now) / 1000))
end
return {excess, merged, now}
