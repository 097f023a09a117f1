-- progress: note, before a progress callback is posted, the text it covers, if the lease
-- still holds. A run of the turn after a crash reads it back with its claim and posts no
-- progress twice; a drainer that lost its conversation posts nothing more.
--
-- KEYS[1] conv:<conversation>   KEYS[2] msg:<id>
-- ARGV[1] lease token   ARGV[2] the text the progress covers, cumulatively
-- Returns 1 when noted (post it) | 0 when the lease is gone (do not)

if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[2], 'progress', ARGV[2])
return 1
