-- event: record worker frames of a running turn in the message's stream, if the lease still
-- holds (a drainer that lost its conversation must not write into another run's events).
--
-- KEYS[1] conv:<conversation>
-- KEYS[2] events:<id>
-- ARGV[1] lease token   ARGV[2] stream cap (approximate)   ARGV[3] notify channel
-- ARGV[4] the message's reply channel ('' when it has none)   ARGV[5] message id
-- ARGV[6..] type, data pairs, oldest first
-- Publishes the last entry's id on the notify channel (readers of the message anywhere), and
-- `<message id>\n\n<id of the entry before them> <id of the last>\n<the frames as SSE>` on the
-- reply channel: the API process that took a stream message hands the frames to its reader
-- without a subscription or a read of its own (finish publishes the outcome there the same
-- way, with the outcome between the two line feeds).
-- Returns {'ok', id of the last entry} | {'stale'}

if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then
  return {'stale'}
end
local reply = ARGV[4] ~= ''
-- the pieces of what the reply channel hears, joined once at the end
local told = {ARGV[5], '\n\n', '', ' ', '', '\n'}
if reply then
  local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', '1')[1]
  if last then
    told[3] = last[1]
  end
end
local id
for i = 6, #ARGV, 2 do
  id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'type', ARGV[i], 'data', ARGV[i + 1])
  if reply then
    local at = #told
    told[at + 1], told[at + 2], told[at + 3], told[at + 4] = 'id: ', id, '\ndata: ', ARGV[i + 1]
    told[at + 5] = '\n\n'
  end
end
redis.call('PUBLISH', ARGV[3], id)
if reply then
  told[5] = id
  redis.call('PUBLISH', ARGV[4], table.concat(told))
end
return {'ok', id}
