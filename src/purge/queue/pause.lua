-- Moves the fleet's limiter forward (never back), so claims wait until ARGV[1] - burst.
-- KEYS: pace. ARGV: the limiter's new earliest state, now.
local t = tonumber(redis.call('GET', KEYS[1]) or '0')
local want = tonumber(ARGV[1])
if t < want then
  redis.call('SET', KEYS[1], want, 'PX', want - tonumber(ARGV[2]) + 1000)
end
return 1
