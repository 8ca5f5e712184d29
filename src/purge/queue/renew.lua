-- Renews this instance's leases while it is still sending. KEYS: processing, owner.
-- ARGV: new lease deadline ms, instance id, ids... Only items still leased to this instance are
-- renewed (one whose lease ran out may be another instance's now). Returns how many.
local n = 0
for i = 3, #ARGV do
  if redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[2] and redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], ARGV[1], ARGV[i])
    n = n + 1
  end
end
return n
