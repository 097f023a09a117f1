-- event: record worker frames of a running turn in the message's stream, if the lease still
-- holds (a drainer that lost its conversation must not write into another run's events).
--
-- KEYS[1] conv:<conversation>
-- KEYS[2] events:<id>
-- ARGV[1] lease token   ARGV[2] stream cap (approximate)   ARGV[3] notify channel
-- ARGV[4] the message's reply channel ('' when it has none)   ARGV[5] message id
-- ARGV[6..] type, data pairs, oldest first
-- Publishes the last entry's id on the notify channel (readers of the message anywhere), and
-- the frames on the reply channel, as told.lua writes them with no outcome: the API process
-- that took a stream message hands them to its reader without a subscription or a read of
-- its own (finish publishes the outcome there the same way).
-- Returns {'ok', id of the last entry} | {'stale'}

if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then
  return {'stale'}
end
local told = told_start(ARGV[4], KEYS[2], ARGV[5], '')
local id
for i = 6, #ARGV, 2 do
  id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'type', ARGV[i], 'data', ARGV[i + 1])
  told_add(told, id, ARGV[i + 1])
end
redis.call('PUBLISH', ARGV[3], id)
told_publish(told, ARGV[4], id)
return {'ok', id}
