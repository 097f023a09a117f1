-- claim: after BLMOVE ready -> processing:<drainer>, start the head message of a conversation.
--
-- KEYS[1] conv:<conversation>
-- KEYS[2] q:<conversation>
-- KEYS[3] msg:<head id>     (the head the caller read with LINDEX)
-- KEYS[4] processing:<drainer>
-- KEYS[5] stats
-- ARGV[1] conversation   ARGV[2] head id   ARGV[3] drainer id   ARGV[4] lease token   ARGV[5] now (ms)
-- Returns {'ok', attempts, body, enqueued_at, reply, mode, user_id, client_message_id, callback_url}
--       | {'moved', current head}  the head changed since LINDEX: read it again
--       | {'empty'}                nothing queued: the stray entry was removed

local head = redis.call('LINDEX', KEYS[2], 0)
if not head then
  redis.call('LREM', KEYS[4], 0, ARGV[1])
  if redis.call('HGET', KEYS[1], 'state') == 'running' then
    redis.call('HINCRBY', KEYS[5], 'processing', -1)
  end
  if redis.call('DEL', KEYS[1]) == 1 then
    redis.call('HINCRBY', KEYS[5], 'active_queues', -1)
  end
  return {'empty'}
end
if head ~= ARGV[2] then
  return {'moved', head}
end

if redis.call('HGET', KEYS[1], 'state') ~= 'running' then
  redis.call('HINCRBY', KEYS[5], 'processing', 1)
  redis.call('HINCRBY', KEYS[5], 'queued', -1)
end
redis.call('HSET', KEYS[1], 'state', 'running', 'message_id', head, 'drainer', ARGV[3],
  'since', ARGV[5], 'lease', ARGV[4])
local attempts = redis.call('HINCRBY', KEYS[3], 'attempts', 1)
redis.call('HSET', KEYS[3], 'status', 'running', 'started_at', ARGV[5], 'drainer', ARGV[3])
local m = redis.call('HMGET', KEYS[3], 'body', 'enqueued_at', 'reply', 'mode', 'user_id',
  'client_message_id', 'callback_url')
return {'ok', attempts, m[1] or '', m[2] or '0', m[3] or '', m[4] or '', m[5] or '', m[6] or '', m[7] or ''}
