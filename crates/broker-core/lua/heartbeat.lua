-- heartbeat: record that a drainer is alive, on the Redis clock (no skew between machines).
--
-- KEYS[1] drainers (sorted set: drainer id -> last heartbeat, ms)
-- ARGV[1] drainer id
-- Returns the heartbeat time (ms)

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
return now
