-- finish: store the outcomes of one or more turns (completed or failed) of one drainer and
-- release their conversations. Only the holder of a turn's current lease can finish it: a
-- stale lease changes nothing of that turn.
--
-- A drainer sends the turns that end in the same pass of its runtime in one call: the call's
-- own cost (the script's start, its MULTI/EXEC in the AOF) and the stats counters' writes
-- are then paid once per batch, not per turn. The turns are finished in order, each as if
-- alone.
--
-- KEYS[1] processing:<drainer>   KEYS[2] ready   KEYS[3] stats   KEYS[4] dead
-- KEYS[5] oldest (a conversation's score becomes its new head's enqueue time, or it leaves)
-- and for turn t (from 0), at k = 5 + 4t:
--   KEYS[k+1] conv:<conversation>   KEYS[k+2] q:<conversation>   KEYS[k+3] msg:<id>
--   KEYS[k+4] events:<id>, also the channel its readers are notified on
-- ARGV[1] now (ms)   ARGV[2] result ttl (s)   ARGV[3] dead-list cap   ARGV[4] stream cap
-- ARGV[5] how the reply channels of API processes that read batched outcomes start (below)
-- ARGV[6] the number of turns
-- then each turn's record, one after the other:
--   conversation, message id, lease token, 'completed' | 'failed', outcome JSON,
--   terminal frame type ('' when the message's frames are not recorded: then no frame is
--   written), terminal frame data, the message's reply channel as its claim read it ('' for
--   none: the outcome is published there as `<message id>\n<outcome JSON>`, followed, when
--   frames are written, by those frames as told.lua writes them, so that the reader of a
--   stream message on that process sends them without reading the stream; the outcomes
--   without frames of several turns for one channel go in one message, see below),
--   n dead-list entries, f worker frames not yet recorded (they go before the terminal
--   frame), h fields for the message hash, then the n entries, the f type, data pairs and the
--   h field, value pairs. A field named `+<counter>` is not written to the message: its value
--   is added to that stats counter (the drainer's histogram buckets and failure codes). A
--   failed message keeps its `body`, so that it can be redriven.
-- Returns, per turn in order, the number of messages still queued in its conversation, or
-- -1 when its lease was stale.
--
-- The outcomes without frames (sync messages) for one reply channel that starts with
-- ARGV[5] are published once, at the end: alone as `<message id>\n<outcome JSON>`, several as
-- `*\n<message id>\n<outcome JSON>\n<message id>\n<outcome JSON>...` (an outcome is compact
-- JSON, without a line feed). The API process behind the channel then reads one pub/sub
-- message per batch, not per message. An older API process, whose channel is named
-- otherwise, gets one message per outcome.

local now = ARGV[1]
local counts = {processing = 0, active_queues = 0}
local dead = 0
-- channel -> {'*', message id, outcome, ...}, and the channels in the order first used
local outcomes, channels = {}, {}

-- Finishes the turn whose record starts at ARGV[a], with keys from KEYS[k + 1]; returns
-- what is left in its queue, or -1.
local function finish(k, a)
  local conv, q, msg, events = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]
  local conversation, message_id, status, outcome = ARGV[a], ARGV[a + 1], ARGV[a + 3], ARGV[a + 4]
  local n, f = tonumber(ARGV[a + 8]), tonumber(ARGV[a + 9])
  local entries = a + 11
  local frames = entries + n
  local fields = frames + 2 * f
  local last_field = fields + 2 * tonumber(ARGV[a + 10]) - 1

  if redis.call('HGET', conv, 'lease') ~= ARGV[a + 2] then
    return -1
  end
  -- The head must be this message. Popped at once, and pushed back in the (never yet seen)
  -- case that it is not, so the common case needs no LINDEX of its own.
  local head = redis.call('LPOP', q)
  if head ~= message_id then
    if head then
      redis.call('LPUSH', q, head)
    end
    return -1
  end

  local set = {'status', status, 'outcome', outcome, 'finished_at', now}
  for i = fields, last_field, 2 do
    local name = ARGV[i]
    if name:sub(1, 1) == '+' then
      local counter = name:sub(2)
      counts[counter] = (counts[counter] or 0) + tonumber(ARGV[i + 1])
    else
      set[#set + 1] = name
      set[#set + 1] = ARGV[i + 1]
      if name == 'callback' then
        -- 'delivered' or 'failed'
        local counter = 'callbacks_' .. ARGV[i + 1] .. '_total'
        counts[counter] = (counts[counter] or 0) + 1
      end
    end
  end
  redis.call('HSET', msg, unpack(set))
  if status ~= 'failed' then
    redis.call('HDEL', msg, 'body')
  end
  redis.call('EXPIRE', msg, ARGV[2])
  local reply = ARGV[a + 7]
  if ARGV[a + 5] ~= '' then
    -- the turn's last worker frames, then the one terminal frame, atomically with the outcome
    local told = told_start(reply, events, message_id, outcome)
    local id
    local function add(kind, data)
      id = redis.call('XADD', events, 'MAXLEN', '~', ARGV[4], '*', 'type', kind, 'data', data)
      told_add(told, id, data)
    end
    for i = frames, fields - 1, 2 do
      add(ARGV[i], ARGV[i + 1])
    end
    add(ARGV[a + 5], ARGV[a + 6])
    redis.call('EXPIRE', events, ARGV[2])
    redis.call('PUBLISH', events, id)
    told_publish(told, reply, id)
  elseif reply:sub(1, #ARGV[5]) ~= ARGV[5] then
    if reply ~= '' then
      redis.call('PUBLISH', reply, message_id .. '\n' .. outcome)
    end
  else
    local heard = outcomes[reply]
    if not heard then
      heard = {'*'}
      outcomes[reply] = heard
      channels[#channels + 1] = reply
    end
    heard[#heard + 1] = message_id
    heard[#heard + 1] = outcome
  end
  -- From the tail, where the oldest takes are (BLMOVE and the take push at the head), and
  -- turns end about in the order they began: the scan stops at the first match instead of
  -- reading the whole list (up to the drainer's concurrency).
  -- A conversation is in at most one list once (docs/design.md §6); a copy left by a bug would be
  -- released by reconcile as nobody's turn.
  redis.call('LREM', KEYS[1], '-1', conversation)
  counts.processing = counts.processing - 1
  local total = status .. '_total'
  counts[total] = (counts[total] or 0) + 1
  for i = entries, frames - 1 do
    redis.call('LPUSH', KEYS[4], ARGV[i])
  end
  dead = dead + n

  local left = redis.call('LLEN', q)
  if left > 0 then
    local next_id = redis.call('LINDEX', q, '0')
    local next_msg = msg:sub(1, #msg - #message_id) .. next_id
    redis.call('ZADD', KEYS[5], redis.call('HGET', next_msg, 'enqueued_at') or now, conversation)
  else
    redis.call('ZREM', KEYS[5], conversation)
  end
  if left > 0 then
    -- more work: back of the line, so a long queue does not hold back the others
    redis.call('HSET', conv, 'state', 'ready', 'since', now)
    redis.call('HDEL', conv, 'message_id', 'drainer', 'lease')
    redis.call('LPUSH', KEYS[2], conversation)
  else
    redis.call('DEL', conv)
    counts.active_queues = counts.active_queues - 1
  end
  return left
end

local results = {}
local a = 7
for t = 1, tonumber(ARGV[6]) do
  results[t] = finish(1 + 4 * t, a)
  -- the next record starts after this one's 11 fixed values and n + 2f + 2h more
  a = a + 11 + tonumber(ARGV[a + 8]) + 2 * tonumber(ARGV[a + 9]) + 2 * tonumber(ARGV[a + 10])
end

for _, channel in ipairs(channels) do
  local heard = outcomes[channel]
  if #heard == 3 then
    redis.call('PUBLISH', channel, heard[2] .. '\n' .. heard[3])
  else
    redis.call('PUBLISH', channel, table.concat(heard, '\n'))
  end
end

if dead > 0 then
  redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[3]) - 1)
end
-- The counters' changes, written once for the whole batch.
for field, delta in pairs(counts) do
  if delta ~= 0 then
    redis.call('HINCRBY', KEYS[3], field, delta)
  end
end
return results
