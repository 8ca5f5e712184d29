-- Leases up to ARGV[5] due items (one request's worth). KEYS: queue, processing, items, pace, owner.
-- ARGV: now ms, lease ms, pacing interval ms, burst ms, most items, instance id.
-- Items whose lease ran out go back to the queue first (their instance died).
-- Returns {1, orphans, id, json, id, json, ...} (now leased to the caller, one pacing slot taken;
-- `orphans` ids without an item were dropped) or {0, next due ms or -1} (nothing due, or the
-- fleet's pace says wait).
local now = tonumber(ARGV[1])
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 100)
for _, id in ipairs(expired) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', KEYS[5], id)
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
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[5]))
local out = {1, 0}
local deadline = now + tonumber(ARGV[2])
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  local item = redis.call('HGET', KEYS[3], id)
  if item then
    redis.call('ZADD', KEYS[2], deadline, id)
    redis.call('HSET', KEYS[5], id, ARGV[6])
    out[#out + 1] = id
    out[#out + 1] = item
  else
    out[2] = out[2] + 1
  end
end
if interval > 0 then
  redis.call('SET', KEYS[4], tat + interval, 'PX', tat + interval - now + 1000)
end
return out
