-- Leases the next due item. KEYS: queue, processing, items, pace.
-- ARGV: now ms, lease ms, pacing interval ms, burst ms.
-- Returns {1, item json} (now leased to the caller), {0, next due ms or -1} (nothing due, or
-- the fleet's pace says wait), or {2, id} (an id without an item, dropped).
local now = tonumber(ARGV[1])
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 100)
for _, id in ipairs(expired) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZADD', KEYS[1], now, id)
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #first == 0 then return {0, -1} end
local due = tonumber(first[2])
if due > now then return {0, due} end
local interval = tonumber(ARGV[3])
local burst = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[4]) or '0')
if tat < now then tat = now end
if tat - now > burst then return {0, tat - burst} end
local id = first[1]
redis.call('ZREM', KEYS[1], id)
local item = redis.call('HGET', KEYS[3], id)
if not item then return {2, id} end
if interval > 0 then
  redis.call('SET', KEYS[4], tat + interval, 'PX', tat + interval - now + 1000)
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), id)
return {1, item}
