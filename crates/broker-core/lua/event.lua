-- event: record worker frames of a running turn in the message's stream, if the lease still
-- holds (a drainer that lost its conversation must not write into another run's events).
--
-- KEYS[1] conv:<conversation>
-- KEYS[2] events:<id>
-- ARGV[1] lease token   ARGV[2] stream cap (approximate)   ARGV[3] notify channel
-- ARGV[4] the message's reply channel ('' when it has none)   ARGV[5] message id
-- ARGV[6..] type, data pairs, oldest first
-- Publishes the last entry's id on the notify channel (readers of the message anywhere), and
-- `<message id>\n` on the reply channel (the API process that took a stream message wakes its
-- reader without a subscription of its own; finish publishes the outcome there).
-- Returns {'ok', id of the last entry} | {'stale'}

if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then
  return {'stale'}
end
local id
for i = 6, #ARGV, 2 do
  id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'type', ARGV[i], 'data', ARGV[i + 1])
end
redis.call('PUBLISH', ARGV[3], id)
if ARGV[4] ~= '' then
  redis.call('PUBLISH', ARGV[4], ARGV[5] .. '\n')
end
return {'ok', id}
