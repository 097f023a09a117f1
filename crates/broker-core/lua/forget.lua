-- forget: drop a dead drainer once its processing list is empty and it is still silent.
--
-- KEYS[1] drainers   KEYS[2] processing:<drainer>
-- ARGV[1] drainer id   ARGV[2] dead-after (ms)
-- Returns 1 when forgotten, 0 otherwise

if redis.call('LLEN', KEYS[2]) > 0 then
  return 0
end
local seen = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not seen then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(seen) >= now - tonumber(ARGV[2]) then
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
