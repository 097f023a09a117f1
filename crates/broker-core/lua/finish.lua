-- finish: store the outcome of a turn (completed or failed) and release the conversation.
-- Only the holder of the current lease can finish: a stale lease changes nothing.
--
-- KEYS[1] conv:<conversation>
-- KEYS[2] q:<conversation>
-- KEYS[3] msg:<id>
-- KEYS[4] processing:<drainer>
-- KEYS[5] ready
-- KEYS[6] stats
-- KEYS[7] dead
-- KEYS[8] events:<id>
-- ARGV[1] conversation   ARGV[2] message id   ARGV[3] lease token   ARGV[4] now (ms)
-- ARGV[5] 'completed' | 'failed'   ARGV[6] outcome JSON   ARGV[7] result ttl (s)
-- ARGV[8] dead-list cap   ARGV[9] terminal frame type ('' when the message's frames are not
-- recorded: then no frame is written)   ARGV[10] terminal frame data
-- ARGV[11] stream cap   ARGV[12] notify channel   ARGV[13] n, the number of dead-list entries
-- ARGV[14] f, the number of worker frames not yet recorded (they go before the terminal frame)
-- ARGV[15] the message's reply channel as its claim read it ('' for none): the outcome is
--          published there as `<message id>\n<outcome JSON>`, followed, when frames are
--          written, by those frames as told.lua writes them, so that the reader of a stream
--          message on that process sends them without reading the stream
-- ARGV[16 .. 15+n] dead-list entries   ARGV[16+n .. 15+n+2f] type, data pairs of those frames
-- ARGV[16+n+2f ..] field, value pairs for the message hash
-- Returns {'ok', messages still queued} | {'stale'}

if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[3] then
  return {'stale'}
end
-- The head must be this message. Popped at once, and pushed back in the (never yet seen)
-- case that it is not, so the common case needs no LINDEX of its own.
local head = redis.call('LPOP', KEYS[2])
if head ~= ARGV[2] then
  if head then
    redis.call('LPUSH', KEYS[2], head)
  end
  return {'stale'}
end

local n = tonumber(ARGV[13])
local f = tonumber(ARGV[14])
local first_field = 16 + n + 2 * f
redis.call('HSET', KEYS[3], 'status', ARGV[5], 'outcome', ARGV[6], 'finished_at', ARGV[4],
  unpack(ARGV, first_field))
for i = first_field, #ARGV, 2 do
  if ARGV[i] == 'callback' then
    -- 'delivered' or 'failed'
    redis.call('HINCRBY', KEYS[6], 'callbacks_' .. ARGV[i + 1] .. '_total', '1')
  end
end
redis.call('HDEL', KEYS[3], 'body')
redis.call('EXPIRE', KEYS[3], ARGV[7])
if ARGV[9] ~= '' then
  -- the turn's last worker frames, then the one terminal frame, atomically with the outcome
  local told = told_start(ARGV[15], KEYS[8], ARGV[2], ARGV[6])
  local id
  local function add(kind, data)
    id = redis.call('XADD', KEYS[8], 'MAXLEN', '~', ARGV[11], '*', 'type', kind, 'data', data)
    told_add(told, id, data)
  end
  for i = 16 + n, 15 + n + 2 * f, 2 do
    add(ARGV[i], ARGV[i + 1])
  end
  add(ARGV[9], ARGV[10])
  redis.call('EXPIRE', KEYS[8], ARGV[7])
  redis.call('PUBLISH', ARGV[12], id)
  told_publish(told, ARGV[15], id)
elseif ARGV[15] ~= '' then
  redis.call('PUBLISH', ARGV[15], ARGV[2] .. '\n' .. ARGV[6])
end
redis.call('LREM', KEYS[4], '0', ARGV[1])
redis.call('HINCRBY', KEYS[6], 'processing', '-1')
redis.call('HINCRBY', KEYS[6], ARGV[5] .. '_total', '1')
if n > 0 then
  for i = 16, 15 + n do
    redis.call('LPUSH', KEYS[7], ARGV[i])
  end
  redis.call('LTRIM', KEYS[7], 0, tonumber(ARGV[8]) - 1)
end

local left = redis.call('LLEN', KEYS[2])
if left > 0 then
  -- more work: back of the line, so a long queue does not hold back the others
  redis.call('HSET', KEYS[1], 'state', 'ready', 'since', ARGV[4])
  redis.call('HDEL', KEYS[1], 'message_id', 'drainer', 'lease')
  redis.call('LPUSH', KEYS[5], ARGV[1])
else
  redis.call('DEL', KEYS[1])
  redis.call('HINCRBY', KEYS[6], 'active_queues', '-1')
end
return {'ok', left}
