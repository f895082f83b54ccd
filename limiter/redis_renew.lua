-- Renew (redis_leases.go): extend the leases of one client's requests
-- that still run on the calling instance. A lease that expired while its
-- renewals failed is added again, since its request runs; one noted as
-- ended (settled, or cancelled) is left alone.
-- KEYS[1] the client's leases, KEYS[2] their reservations (kept as long);
-- ARGV[1] the lease TTL in ms, then the IDs.
local clock = redis.call('TIME')
local expiry = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if not score or tonumber(score) > 0 then
    redis.call('ZADD', KEYS[1], expiry, ARGV[i])
  end
end
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('PEXPIREAT', KEYS[1], string.format('%.0f', expiry))
end
local held = redis.call('PTTL', KEYS[2])
if held ~= -2 and held < tonumber(ARGV[1]) then
  redis.call('PEXPIREAT', KEYS[2], string.format('%.0f', expiry))
end
return 0
