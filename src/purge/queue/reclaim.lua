-- A restarted instance takes back its own leases at once (it is not sending them any more).
-- KEYS: processing, owner, queue. ARGV: instance id, now ms. Returns how many went back.
local n = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if redis.call('HGET', KEYS[2], id) == ARGV[1] then
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
    redis.call('ZADD', KEYS[3], ARGV[2], id)
    n = n + 1
  end
end
return n
