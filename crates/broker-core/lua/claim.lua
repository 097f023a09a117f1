-- claim: after BLMOVE ready -> processing:<drainer>, start the head message of a conversation.
--
-- The one script that touches a key not given in KEYS: the head message's hash, whose id it
-- reads here (reading it in a separate LINDEX would cost a round trip per message). Its name
-- is ARGV[5] .. <head id>, and ARGV[5] carries the same `{shard}` hash tag as every key here,
-- so on a Redis Cluster it lives in the same slot.
--
-- KEYS[1] conv:<conversation>
-- KEYS[2] q:<conversation>
-- KEYS[3] processing:<drainer>
-- KEYS[4] stats
-- ARGV[1] conversation   ARGV[2] drainer id   ARGV[3] lease token   ARGV[4] now (ms)
--         ARGV[5] message key prefix (`<prefix>:{<shard>}:msg:`)
-- Returns {'ok', head id, attempts, body, enqueued_at, reply, mode, user_id, client_message_id,
--          callback_url}
--       | {'empty'}                nothing queued: the stray entry was removed

local head = redis.call('LINDEX', KEYS[2], 0)
if not head then
  redis.call('LREM', KEYS[3], 0, ARGV[1])
  if redis.call('HGET', KEYS[1], 'state') == 'running' then
    redis.call('HINCRBY', KEYS[4], 'processing', -1)
  end
  if redis.call('DEL', KEYS[1]) == 1 then
    redis.call('HINCRBY', KEYS[4], 'active_queues', -1)
  end
  return {'empty'}
end
local msg = ARGV[5] .. head

if redis.call('HGET', KEYS[1], 'state') ~= 'running' then
  redis.call('HINCRBY', KEYS[4], 'processing', 1)
  redis.call('HINCRBY', KEYS[4], 'queued', -1)
end
redis.call('HSET', KEYS[1], 'state', 'running', 'message_id', head, 'drainer', ARGV[2],
  'since', ARGV[4], 'lease', ARGV[3])
local attempts = redis.call('HINCRBY', msg, 'attempts', 1)
redis.call('HSET', msg, 'status', 'running', 'started_at', ARGV[4], 'drainer', ARGV[2])
local m = redis.call('HMGET', msg, 'body', 'enqueued_at', 'reply', 'mode', 'user_id',
  'client_message_id', 'callback_url')
return {'ok', head, attempts, m[1] or '', m[2] or '0', m[3] or '', m[4] or '', m[5] or '',
  m[6] or '', m[7] or ''}
