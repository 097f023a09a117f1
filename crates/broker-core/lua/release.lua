-- release: put a claimed conversation back at the front of ready without losing its place.
-- Used on shutdown, by reconcile for entries nobody runs, and by reap for dead drainers.
--
-- KEYS[1] conv:<conversation>
-- KEYS[2] q:<conversation>
-- KEYS[3] processing:<owner>
-- KEYS[4] ready
-- KEYS[5] stats
-- KEYS[6] msg:<running id>  (the id the caller read from conv.message_id; any key when none)
-- ARGV[1] conversation   ARGV[2] running message id as read ('' when none)
-- ARGV[3] lease token ('' to release whoever holds it)   ARGV[4] now (ms)
-- Returns {'ok'} | {'absent'} not in that processing list | {'stale'} lease changed
--       | {'retry', running id} conv.message_id changed since the caller read it

local state = redis.call('HGET', KEYS[1], 'state')
local running = redis.call('HGET', KEYS[1], 'message_id') or ''
if ARGV[3] ~= '' and redis.call('HGET', KEYS[1], 'lease') ~= ARGV[3] then
  return {'stale'}
end
if state == 'running' and running ~= ARGV[2] then
  return {'retry', running}
end
if redis.call('LREM', KEYS[3], '0', ARGV[1]) == 0 then
  return {'absent'}
end

if state == 'running' then
  if redis.call('HGET', KEYS[6], 'status') == 'running' then
    redis.call('HSET', KEYS[6], 'status', 'queued')
  end
  redis.call('HINCRBY', KEYS[5], 'processing', '-1')
  redis.call('HINCRBY', KEYS[5], 'queued', '1')
end
if redis.call('LLEN', KEYS[2]) > 0 then
  redis.call('HSET', KEYS[1], 'state', 'ready', 'since', ARGV[4])
  redis.call('HDEL', KEYS[1], 'message_id', 'drainer', 'lease')
  redis.call('RPUSH', KEYS[4], ARGV[1])
else
  if redis.call('DEL', KEYS[1]) == 1 then
    redis.call('HINCRBY', KEYS[5], 'active_queues', '-1')
  end
end
redis.call('HINCRBY', KEYS[5], 'released_total', '1')
return {'ok'}
