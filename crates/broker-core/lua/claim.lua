-- claim: start the head message of a conversation this drainer has just taken into its
-- processing list, and, while there is room, of more ready conversations taken here.
--
-- The drainer sends it in one pipeline right behind its `BLMOVE ready -> processing:<drainer>`
-- (ARGV[1] == ''): Redis runs it as soon as the BLMOVE returns, on the same connection, so a
-- turn starts with one round trip instead of two. It then claims the head of the processing
-- list, where BLMOVE put the conversation, unless that head is already running (the BLMOVE
-- timed out and moved nothing). A conversation a lost reply left there in state `ready` is
-- claimed by the next call: its turn runs then.
--
-- Under load many conversations are ready at once. Up to ARGV[6] - 1 more are then moved
-- (`RPOP` with a count, then one `LPUSH`: the same ends as the BLMOVE) and claimed here,
-- atomically: a drainer with room for k turns starts k of them in one round trip instead of
-- k. The lease of the conversation
-- returned at position p >= 2 is ARGV[3] .. '.' .. p; the first one's is ARGV[3] itself.
--
-- The one script that touches keys not given in KEYS: the conversations' state and queues and
-- their head messages' hashes, whose names depend on what was moved and on the head ids. They
-- are built from ARGV[5], which carries the same `{shard}` hash tag as every key here, so on a
-- Redis Cluster they live in the same slot.
--
-- KEYS[1] processing:<drainer>   KEYS[2] stats   KEYS[3] ready
-- ARGV[1] conversation ('' for the head of KEYS[1])   ARGV[2] drainer id   ARGV[3] lease token
-- ARGV[4] now (ms), or '' for the Redis clock: behind a BLMOVE that blocked, the caller's
--         clock at sending is up to the block time old   ARGV[5] key base (`<prefix>:{<shard>}:`)
-- ARGV[6] (ARGV[1] == '' only) how many turns the drainer has room for, at least 1
-- Returns, for a named conversation, one entry:
--         the turn started, as one string: conversation, head id, attempts, enqueued_at,
--          reply, mode, user_id, client_message_id, callback_url, front (the worker's
--          route it came in on, JSON), progress (the text its progress callbacks covered
--          in an earlier run), traceparent (the client's W3C trace context) and body
--          joined by NUL bytes, body last. No field can hold a
--          NUL (the API refuses control characters in what it stores, and JSON escapes
--          them), and the reader splits off twelve fields, so even one could only end up in
--          the body. One string instead of ten values: the
--          drainer's Redis client pays for each value of a reply.
--       | {'empty', conversation}   nothing queued: the stray entry was removed
--       | {'held', conversation}   held (hash `held`): parked with state 'held', in no list
--   and for ARGV[1] == '' while drainers are paused (key `paused`): {{'paused'}}, with what the
--   BLMOVE moved put back at the front of ready (counted in stats `paused_takes`)
--   and for ARGV[1] == '' a list of such entries, in the order taken: empty when nothing new
--   was at the head.

local now = ARGV[4]
if now == '' then
  local t = redis.call('TIME')
  now = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))
end

-- What the claims below change in the stats counters, written once at the end: a batch of
-- k claims then costs two HINCRBY instead of 2k.
local delta = {processing = 0, queued = 0, active_queues = 0}

-- Claims `conv`, the head of KEYS[1], under `lease`; nil when `taken` and it already runs.
local function claim(conv, lease, taken)
  local conv_key = ARGV[5] .. 'conv:' .. conv
  local state = redis.call('HGET', conv_key, 'state')
  if taken and state == 'running' then
    return nil
  end

  local head = redis.call('LINDEX', ARGV[5] .. 'q:' .. conv, '0')
  if not head then
    redis.call('LREM', KEYS[1], '0', conv)
    if state == 'running' then
      delta.processing = delta.processing - 1
    end
    if redis.call('DEL', conv_key) == 1 then
      delta.active_queues = delta.active_queues - 1
    end
    return {'empty', conv}
  end
  if state ~= 'running' and redis.call('HEXISTS', ARGV[5] .. 'held', conv) == 1 then
    -- Held: parked out of every list until resumed (resume puts it back in ready).
    redis.call('LREM', KEYS[1], '0', conv)
    redis.call('HSET', conv_key, 'state', 'held', 'since', now)
    return {'held', conv}
  end
  local msg = ARGV[5] .. 'msg:' .. head

  if state ~= 'running' then
    delta.processing = delta.processing + 1
    delta.queued = delta.queued - 1
  end
  redis.call('HSET', conv_key, 'state', 'running', 'message_id', head, 'drainer', ARGV[2],
    'since', now, 'lease', lease)
  local m = redis.call('HMGET', msg, 'body', 'enqueued_at', 'reply', 'mode', 'user_id',
    'client_message_id', 'callback_url', 'attempts', 'front', 'progress', 'traceparent')
  -- A computed number, formatted once by Lua when passed to redis.call, as the deltas are.
  local attempts = (tonumber(m[8]) or 0) + 1
  redis.call('HSET', msg, 'attempts', attempts, 'status', 'running', 'started_at', now,
    'drainer', ARGV[2])
  return table.concat({conv, head, attempts, m[2] or '0', m[3] or '', m[4] or '',
    m[5] or '', m[6] or '', m[7] or '', m[9] or '', m[10] or '', m[11] or '', m[1] or ''}, '\0')
end

-- Writes the counters' changes; passes `result` through.
local function counted(result)
  for _, field in ipairs({'processing', 'queued', 'active_queues'}) do
    if delta[field] ~= 0 then
      redis.call('HINCRBY', KEYS[2], field, delta[field])
    end
  end
  return result
end

if ARGV[1] ~= '' then
  return counted(claim(ARGV[1], ARGV[3], false))
end

local claimed = {}
local conv = redis.call('LINDEX', KEYS[1], '0')
if redis.call('EXISTS', ARGV[5] .. 'paused') == 1 then
  -- Drainers are paused: what the BLMOVE moved goes back to the front of ready, unstarted.
  if conv and redis.call('HGET', ARGV[5] .. 'conv:' .. conv, 'state') ~= 'running' then
    redis.call('LMOVE', KEYS[1], KEYS[3], 'LEFT', 'RIGHT')
    redis.call('HINCRBY', KEYS[2], 'paused_takes', '1')
  end
  return {{'paused'}}
end
local first = conv and claim(conv, ARGV[3], true)
if not first then
  -- the BLMOVE moved nothing: the head is a turn already under way, or there is none
  return claimed
end
claimed[1] = first
local room = (tonumber(ARGV[6]) or 1) - 1
if room > 0 then
  -- Moved all at once, as `room` LMOVEs from the same ends would move them one by one (the
  -- last moved ends up at the head): two calls instead of one per conversation, and one
  -- more that finds the list empty.
  local moved = redis.call('RPOP', KEYS[3], room)
  if moved then
    redis.call('LPUSH', KEYS[1], unpack(moved))
    for _, conv in ipairs(moved) do
      -- A conversation already running elsewhere (listed twice by mistake) is left for
      -- reconcile, as the BLMOVE's would be; the next one is tried.
      local p = #claimed + 1
      claimed[p] = claim(conv, ARGV[3] .. '.' .. p, true)
    end
  end
end
return counted(claimed)
