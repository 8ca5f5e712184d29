-- Moves a leased item to the queue (retry, release) or the dead letters. KEYS: processing, items,
-- target zset, owner. ARGV: id, json, score, instance id. Only an item still leased to this
-- instance moves (one whose lease passed may already be another instance's).
local owner = redis.call('HGET', KEYS[4], ARGV[1])
if owner and owner ~= ARGV[4] then return 0 end
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('HDEL', KEYS[4], ARGV[1])
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
  return 1
end
return 0
