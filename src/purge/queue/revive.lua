-- Moves a dead letter back to the queue unless another caller did already.
-- KEYS: dead, items, queue. ARGV: id, new json, now.
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
return 1
