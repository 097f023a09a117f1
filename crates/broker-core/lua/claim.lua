-- claim: start the head message of a conversation this drainer has just taken into its
-- processing list.
--
-- The drainer sends it in one pipeline right behind its `BLMOVE ready -> processing:<drainer>`
-- (ARGV[1] == ''): Redis runs it as soon as the BLMOVE returns, on the same connection, so a
-- turn starts with one round trip instead of two. It then claims the head of the processing
-- list, where BLMOVE put the conversation, unless that head is already running (the BLMOVE
-- timed out and moved nothing). A conversation a lost reply left there in state `ready` is
-- claimed by the next call: its turn runs then.
--
-- The one script that touches keys not given in KEYS: the conversation's state and queue and
-- its head message's hash, whose names depend on what BLMOVE moved and on the head id. They
-- are built from ARGV[5], which carries the same `{shard}` hash tag as every key here, so on a
-- Redis Cluster they live in the same slot.
--
-- KEYS[1] processing:<drainer>
-- KEYS[2] stats
-- ARGV[1] conversation ('' for the head of KEYS[1])   ARGV[2] drainer id   ARGV[3] lease token
-- ARGV[4] now (ms), or '' for the Redis clock: behind a BLMOVE that blocked, the caller's
--         clock at sending is up to the block time old   ARGV[5] key base (`<prefix>:{<shard>}:`)
-- Returns {'ok', conversation, head id, attempts, body, enqueued_at, reply, mode, user_id,
--          client_message_id, callback_url}
--       | {'empty', conversation}   nothing queued: the stray entry was removed
--       | {'none'}                  ARGV[1] == '' and nothing new at the head

local now = ARGV[4]
if now == '' then
  local t = redis.call('TIME')
  now = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))
end
local conv = ARGV[1]
if conv == '' then
  conv = redis.call('LINDEX', KEYS[1], 0)
  if not conv then
    return {'none'}
  end
end
local conv_key = ARGV[5] .. 'conv:' .. conv
local state = redis.call('HGET', conv_key, 'state')
if ARGV[1] == '' and state == 'running' then
  -- the BLMOVE moved nothing: the head is a turn already under way
  return {'none'}
end

local head = redis.call('LINDEX', ARGV[5] .. 'q:' .. conv, 0)
if not head then
  redis.call('LREM', KEYS[1], 0, conv)
  if state == 'running' then
    redis.call('HINCRBY', KEYS[2], 'processing', -1)
  end
  if redis.call('DEL', conv_key) == 1 then
    redis.call('HINCRBY', KEYS[2], 'active_queues', -1)
  end
  return {'empty', conv}
end
local msg = ARGV[5] .. 'msg:' .. head

if state ~= 'running' then
  redis.call('HINCRBY', KEYS[2], 'processing', 1)
  redis.call('HINCRBY', KEYS[2], 'queued', -1)
end
redis.call('HSET', conv_key, 'state', 'running', 'message_id', head, 'drainer', ARGV[2],
  'since', now, 'lease', ARGV[3])
local attempts = redis.call('HINCRBY', msg, 'attempts', 1)
redis.call('HSET', msg, 'status', 'running', 'started_at', now, 'drainer', ARGV[2])
local m = redis.call('HMGET', msg, 'body', 'enqueued_at', 'reply', 'mode', 'user_id',
  'client_message_id', 'callback_url')
return {'ok', conv, head, attempts, m[1] or '', m[2] or '0', m[3] or '', m[4] or '', m[5] or '',
  m[6] or '', m[7] or ''}
