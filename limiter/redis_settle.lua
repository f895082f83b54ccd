-- Settle (redis.go): remove the lease, and charge the tokens used beyond
-- the reservation (a refund when negative) to the token bucket, into debt
-- if need be, and to the quota counter of the period of admission.
-- ARGV[10] used - reserved, ARGV[11] lease ID, ARGV[12] lease TTL in ms.
-- Reply: 1 applied, 0 a repeat that changed nothing.
local delta, id, ttl = tonumber(ARGV[10]), ARGV[11], tonumber(ARGV[12])

local admitted = nil
if id ~= '' then
  admitted = tonumber(string.match(id, ':(%d+)$'))
  -- A lease gone before its expiry was settled already.
  if redis.call('ZREM', KEYS[2], id) == 0 and admitted and nowMs < admitted + ttl then
    return 0
  end
end
if delta == 0 then
  return 1
end
if tokN > 0 then
  loadBuckets()
  tUsed = math.max(0, tUsed + delta)
  saveBuckets(false, true)
end
if quotaN > 0 then
  local name, last = period(math.floor((admitted or nowMs) / 1000), quotaP)
  -- Past its period and grace, a counter is gone for good.
  if last + quotaGrace > now / 1000000 then
    local key = KEYS[3] .. name
    local used = redis.call('INCRBY', key, delta)
    if used < 0 then
      redis.call('SET', key, 0, 'KEEPTTL')
    end
    if used == delta then -- new, or was 0: no matter
      redis.call('EXPIREAT', key, last + quotaGrace)
    end
  end
end
return 1
