-- redrive: put a message that failed for good back at the head of its conversation, ahead of
-- what queued since (after the running turn, if one runs), so the conversation's order is
-- kept; and take its entry off the dead list.
--
-- KEYS[1] msg:<id>   KEYS[2] q:<conversation>   KEYS[3] conv:<conversation>   KEYS[4] ready
-- KEYS[5] stats   KEYS[6] events:<id>   KEYS[7] oldest   KEYS[8] dead
-- ARGV[1] message id   ARGV[2] conversation   ARGV[3] now (ms)   ARGV[4] the dead entry as
-- stored ('' for none)
-- Returns {'ok', position} (1 = next to run) | {'absent'} | {'not_failed', status}
--       | {'no_body'} (its request is gone: it expired, or it failed before this version kept it)

local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return {'absent'}
end
if status ~= 'failed' then
  return {'not_failed', status}
end
if not redis.call('HGET', KEYS[1], 'body') then
  return {'no_body'}
end
redis.call('HSET', KEYS[1], 'status', 'queued', 'attempts', '0', 'redriven_at', ARGV[3])
redis.call('HDEL', KEYS[1], 'outcome', 'finished_at', 'started_at', 'drainer', 'callback',
  'callback_attempts', 'progress')
redis.call('PERSIST', KEYS[1])
-- Its old frames (and terminal frame) go: a new run records its own.
redis.call('DEL', KEYS[6])

local state = redis.call('HGET', KEYS[3], 'state')
local position = 1
if state == 'running' then
  redis.call('LINSERT', KEYS[2], 'AFTER', redis.call('HGET', KEYS[3], 'message_id'), ARGV[1])
else
  redis.call('LPUSH', KEYS[2], ARGV[1])
end
if not state then
  -- idle: ready again, at the front (it has waited longest)
  redis.call('HSET', KEYS[3], 'state', 'ready', 'since', ARGV[3])
  redis.call('RPUSH', KEYS[4], ARGV[2])
  redis.call('HINCRBY', KEYS[5], 'active_queues', '1')
end
redis.call('HINCRBY', KEYS[5], 'queued', '1')
redis.call('HINCRBY', KEYS[5], 'redriven_total', '1')
redis.call('ZADD', KEYS[7], 'LT', redis.call('HGET', KEYS[1], 'enqueued_at') or ARGV[3], ARGV[2])
if ARGV[4] ~= '' then
  redis.call('LREM', KEYS[8], '1', ARGV[4])
end
return {'ok', position}
