-- health: the figures of GET /health in one round trip, O(log n) in the number of drainers.
--
-- KEYS[1] stats   KEYS[2] drainers
-- ARGV[1] dead-after (ms)
-- Returns {drainers alive, active_queues, processing, queued}

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local alive = redis.call('ZCOUNT', KEYS[2], now - tonumber(ARGV[1]), '+inf')
local s = redis.call('HMGET', KEYS[1], 'active_queues', 'processing', 'queued')
return {alive, tonumber(s[1] or '0'), tonumber(s[2] or '0'), tonumber(s[3] or '0')}
