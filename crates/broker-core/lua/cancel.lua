-- cancel: remove a message that is still queued; a running or finished message stays.
--
-- KEYS[1] msg:<id>
-- KEYS[2] q:<conversation>
-- KEYS[3] conv:<conversation>
-- KEYS[4] ready
-- KEYS[5] stats
-- KEYS[6] events:<id>
-- KEYS[7] oldest
-- ARGV[1] message id   ARGV[2] conversation   ARGV[3] now (ms)   ARGV[4] outcome JSON
-- ARGV[5] result ttl (s)   ARGV[6] terminal (error) frame data   ARGV[7] notify channel
-- Returns {'ok'} | {'absent'} | {'not_queued', status}

local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return {'absent'}
end
if status ~= 'queued' then
  return {'not_queued', status}
end
-- The head of a running conversation is never 'queued', so this cannot take a running turn.
if redis.call('LREM', KEYS[2], '1', ARGV[1]) == 0 then
  return {'not_queued', status}
end

redis.call('HSET', KEYS[1], 'status', 'cancelled', 'outcome', ARGV[4], 'finished_at', ARGV[3])
redis.call('HDEL', KEYS[1], 'body')
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('HINCRBY', KEYS[5], 'queued', '-1')
redis.call('HINCRBY', KEYS[5], 'cancelled_total', '1')
local reply = redis.call('HGET', KEYS[1], 'reply')
if reply and reply ~= '' then
  redis.call('PUBLISH', reply, ARGV[1] .. '\n' .. ARGV[4])
end
local id = redis.call('XADD', KEYS[6], '*', 'type', 'error', 'data', ARGV[6])
redis.call('EXPIRE', KEYS[6], ARGV[5])
redis.call('PUBLISH', ARGV[7], id)

local head = redis.call('LINDEX', KEYS[2], '0')
if head then
  local head_msg = KEYS[1]:sub(1, #KEYS[1] - #ARGV[1]) .. head
  redis.call('ZADD', KEYS[7], redis.call('HGET', head_msg, 'enqueued_at') or ARGV[3], ARGV[2])
else
  redis.call('ZREM', KEYS[7], ARGV[2])
  -- Nothing left: an idle (or held) conversation leaves ready. One a drainer has just taken
  -- (in its processing list, not yet claimed) is cleaned up by that drainer's claim.
  local parked = redis.call('HGET', KEYS[3], 'state') == 'held'
  if redis.call('LREM', KEYS[4], '0', ARGV[2]) > 0 or parked then
    redis.call('DEL', KEYS[3])
    redis.call('HINCRBY', KEYS[5], 'active_queues', '-1')
  end
end
return {'ok'}
