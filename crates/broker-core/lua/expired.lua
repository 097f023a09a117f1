-- expired: drainers whose last heartbeat is older than the dead-after limit.
--
-- KEYS[1] drainers
-- ARGV[1] dead-after (ms)   ARGV[2] most ids to return
-- Returns a list of drainer ids

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[1])), 'LIMIT', 0, tonumber(ARGV[2]))
