-- resume: release a held conversation. One that was parked while held (state 'held') goes
-- back to the front of ready; one still running or still in ready needs nothing more.
--
-- KEYS[1] held   KEYS[2] conv:<conversation>   KEYS[3] ready
-- ARGV[1] conversation   ARGV[2] now (ms)
-- Returns 1 when it was held | 0

local was = redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('HGET', KEYS[2], 'state') == 'held' then
  redis.call('HSET', KEYS[2], 'state', 'ready', 'since', ARGV[2])
  redis.call('RPUSH', KEYS[3], ARGV[1])
end
return was
