-- told: what the reply channel of a stream message hears of its new frames, put in front of
-- the scripts that record frames (event, finish). It is
-- `<message id>\n<outcome JSON, or nothing>\n<id of the entry before the frames> <id of the
-- last>\n` and then each frame as the API sends it, `id: <id>\ndata: <data>\n\n`
-- (bins/broker-api/src/waiters.rs reads it). A `told` is nil when the message has no reply
-- channel: then every call below does nothing.

-- Starts what `channel` will hear ('' for none), reading the id of the last entry of
-- `stream` before any frame is added (nothing when the stream is empty).
local function told_start(channel, stream, message_id, outcome)
  if channel == '' then
    return nil
  end
  local told = {message_id, '\n', outcome, '\n', '', ' ', '', '\n'}
  local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', '1')[1]
  if last then
    told[5] = last[1]
  end
  return told
end

-- Adds one frame just recorded under `id`; the pieces are joined once, when published.
local function told_add(told, id, data)
  if told then
    local at = #told
    told[at + 1], told[at + 2], told[at + 3] = 'id: ', id, '\ndata: '
    told[at + 4], told[at + 5] = data, '\n\n'
  end
end

-- Publishes it on `channel`; `last` is the id of the last frame added.
local function told_publish(told, channel, last)
  if told then
    told[7] = last
    redis.call('PUBLISH', channel, table.concat(told))
  end
end

