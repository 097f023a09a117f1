-- enqueue: write one or more messages, append each to its conversation, make the
-- conversations runnable.
--
-- An API process sends the messages it accepts in the same pass of its runtime in one call:
-- the call's own cost (the script's start, its MULTI/EXEC in the AOF) and the stats
-- counters' writes are then paid once per batch, not per message. The messages are enqueued
-- in order, each as if alone (two of one conversation queue in that order).
--
-- KEYS[1] ready   KEYS[2] stats   KEYS[3] oldest (conversations with work, by the enqueue
-- time of their oldest unfinished message)
-- and for message m (from 0), at k = 3 + 5m:
--   KEYS[k+1] msg:<id>, the hash of the new message   KEYS[k+2] q:<conversation>
--   KEYS[k+3] conv:<conversation>
--   KEYS[k+4] dedup:<conversation>:<client-message-id> (only read and written when the
--             message has one; the message's own key otherwise)
--   KEYS[k+5] events:<id>, the message's SSE frames: gets the broker's `queued` frame when
--             the message's frames are recorded (stream and async messages)
-- ARGV[1] now (ms)   ARGV[2] max queue depth   ARGV[3] dedup ttl (s)   ARGV[4] the number of
-- messages
-- then each message's record, one after the other: message id, conversation, '1' when a
-- client_message_id was given, '1' when its frames are recorded, h, then h field, value
-- pairs of the message hash
-- Returns, per message in order: position | {position, queued frame id, queued frame data}
--   | {'dup', original message id} | {'full', depth}
--   position 1 means next to run (a running message is not counted); the queued frame's
--   `ahead` counts the messages before it, the running one included. The queued frame comes
--   back when it was recorded, so the API can send it without reading the stream. An
--   accepted message without frames is one number: the API's Redis client pays for each
--   value of a reply.

local now = ARGV[1]
local max_depth = tonumber(ARGV[2])
local counts = {queued = 0, enqueued_total = 0, active_queues = 0, deduplicated_total = 0,
  rejected_full_total = 0}

-- Enqueues the message whose record starts at ARGV[a], with keys from KEYS[k + 1].
local function enqueue(k, a, last_field)
  local msg, q, conv, dedup, events = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4],
    KEYS[k + 5]
  local id, conversation, deduplicated = ARGV[a], ARGV[a + 1], ARGV[a + 2] == '1'

  if deduplicated then
    local original = redis.call('GET', dedup)
    if original then
      counts.deduplicated_total = counts.deduplicated_total + 1
      return {'dup', original}
    end
  end

  -- Appended first, and taken back when the queue was full: the common case then needs no
  -- LLEN of its own.
  local depth = redis.call('RPUSH', q, id) - 1
  if depth >= max_depth then
    redis.call('RPOP', q)
    counts.rejected_full_total = counts.rejected_full_total + 1
    return {'full', depth}
  end

  if depth == 0 then
    redis.call('ZADD', KEYS[3], now, conversation)
  end
  redis.call('HSET', msg, 'status', 'queued', 'enqueued_at', now, 'attempts', '0',
    unpack(ARGV, a + 5, last_field))
  if deduplicated then
    redis.call('SET', dedup, id, 'EX', ARGV[3])
  end

  local position
  local state = redis.call('HGET', conv, 'state')
  if not state then
    -- idle conversation: it becomes ready, at the back of the line
    redis.call('HSET', conv, 'state', 'ready', 'since', now)
    redis.call('LPUSH', KEYS[1], conversation)
    counts.active_queues = counts.active_queues + 1
    position = 1
  elseif state == 'running' then
    position = depth
  else
    position = depth + 1
  end
  counts.queued = counts.queued + 1
  counts.enqueued_total = counts.enqueued_total + 1
  if ARGV[a + 3] == '1' then
    local data = '{"type":"queued","message_id":"' .. id .. '","queue_position":' .. position ..
      ',"ahead":' .. depth .. '}'
    local entry = redis.call('XADD', events, '*', 'type', 'queued', 'data', data)
    return {position, entry, data}
  end
  return position
end

local results = {}
local a = 5
for m = 1, tonumber(ARGV[4]) do
  -- the record's 5 fixed values, then its h field, value pairs
  local last_field = a + 4 + 2 * tonumber(ARGV[a + 4])
  results[m] = enqueue(3 + 5 * (m - 1), a, last_field)
  a = last_field + 1
end

-- The counters' changes, written once for the whole batch.
for field, delta in pairs(counts) do
  if delta ~= 0 then
    redis.call('HINCRBY', KEYS[2], field, delta)
  end
end
return results
