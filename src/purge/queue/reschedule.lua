-- Moves a leased item to the queue (retry) or the dead letters. KEYS: processing, items, target
-- zset. ARGV: id, json, score. Only an item still leased moves (one whose lease passed may
-- already be another instance's).
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
  return 1
end
return 0
