-- Enqueues a provider's items. KEYS: items, queue. ARGV: (id, json, not_before_ms)*.
-- An id already stored is left alone, so enqueueing a job twice does not duplicate it.
local n = 0
for i = 1, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('ZADD', KEYS[2], ARGV[i + 2], ARGV[i])
  end
  n = n + 1
end
return n
