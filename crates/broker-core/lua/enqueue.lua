-- enqueue: write a message, append it to its conversation, make the conversation runnable.
--
-- KEYS[1] msg:<id>          hash of the new message
-- KEYS[2] q:<conversation>  list of message ids
-- KEYS[3] conv:<conversation>
-- KEYS[4] ready
-- KEYS[5] dedup:<conversation>:<client-message-id> (only read/written when ARGV[6] == '1')
-- KEYS[6] stats
-- KEYS[7] events:<id>       the message's SSE frames; gets the broker's `queued` frame when
--                           ARGV[7] == '1' (stream and async messages)
-- ARGV[1] message id   ARGV[2] conversation   ARGV[3] now (ms)   ARGV[4] max queue depth
-- ARGV[5] dedup ttl (s)   ARGV[6] '1' when a client_message_id was given
-- ARGV[7] '1' when the message's frames are recorded   ARGV[8..] field, value pairs of the message hash
-- Returns {'ok', position[, queued frame id, queued frame data]} | {'dup', original message id}
--   | {'full', depth}
--   position 1 means next to run (a running message is not counted). The queued frame comes
--   back when it was recorded, so the API can send it without reading the stream.

if ARGV[6] == '1' then
  local original = redis.call('GET', KEYS[5])
  if original then
    redis.call('HINCRBY', KEYS[6], 'deduplicated_total', '1')
    return {'dup', original}
  end
end

-- Appended first, and taken back when the queue was full: the common case then needs no
-- LLEN of its own.
local depth = redis.call('RPUSH', KEYS[2], ARGV[1]) - 1
if depth >= tonumber(ARGV[4]) then
  redis.call('RPOP', KEYS[2])
  redis.call('HINCRBY', KEYS[6], 'rejected_full_total', '1')
  return {'full', depth}
end

redis.call('HSET', KEYS[1], 'status', 'queued', 'enqueued_at', ARGV[3], 'attempts', '0', unpack(ARGV, 8))
if ARGV[6] == '1' then
  redis.call('SET', KEYS[5], ARGV[1], 'EX', ARGV[5])
end

local position
local state = redis.call('HGET', KEYS[3], 'state')
if not state then
  -- idle conversation: it becomes ready, at the back of the line
  redis.call('HSET', KEYS[3], 'state', 'ready', 'since', ARGV[3])
  redis.call('LPUSH', KEYS[4], ARGV[2])
  redis.call('HINCRBY', KEYS[6], 'active_queues', '1')
  position = 1
elseif state == 'running' then
  position = depth
else
  position = depth + 1
end
redis.call('HINCRBY', KEYS[6], 'queued', '1')
redis.call('HINCRBY', KEYS[6], 'enqueued_total', '1')
if ARGV[7] == '1' then
  local data = '{"type":"queued","message_id":"' .. ARGV[1] .. '","queue_position":' .. position .. '}'
  local id = redis.call('XADD', KEYS[7], '*', 'type', 'queued', 'data', data)
  return {'ok', position, id, data}
end
return {'ok', position}
