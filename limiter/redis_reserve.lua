-- Reserve (redis.go): add tokens to the reservation of an admitted
-- request. Check them in the order of the admit script: the lease's whole
-- reservation against the token burst, the quota counter of the period the
-- request was admitted in (the one its Settle charges), the token bucket.
-- When they pass, take the tokens from the bucket and add them to that
-- counter. No request is counted and no lease added. A refusal writes
-- nothing, and neither does a lease that ended.
-- ARGV[10] tokens, ARGV[11] tokens the lease holds already, ARGV[12] lease
-- ID (of a request from a slice: the name Redis notes it under, see
-- sliceID), ARGV[13] its time of admission (unix ms; 0: now), ARGV[14]
-- the lease TTL (ms), at least as long as the note of the reservation is
-- kept.
-- Reply: reason (limiter.Reason, or -1 alone: the lease ended), retry
-- after (ns, -1: never), then the standing as the state script's.
local tokens, held, id, admitted = tonumber(ARGV[10]), tonumber(ARGV[11]), ARGV[12], tonumber(ARGV[13])
local ttl = tonumber(ARGV[14]) or 0

if id ~= '' then
  -- A lease noted as ended was settled already: its Settle would change
  -- nothing, and a reservation made now would never be replaced. One not
  -- found expired, and still settles, charging what it used.
  local score = redis.call('ZSCORE', KEYS[2], id)
  if score and tonumber(score) < 0 then
    return {-1}
  end
end

local qKey, qUsed, qHeld, qEnd, qLast, qFresh = nil, 0, 0, 0, 0, false
local name
if quotaN > 0 then
  name, qLast = period(math.floor((admitted > 0 and admitted or nowMs) / 1000), quotaP)
  -- Past its period and grace, a counter is gone for good: Settle charges
  -- nothing there, so nothing is checked or reserved there either.
  if qLast + quotaGrace > now / 1000000 then
    qKey = KEYS[3] .. name
    qUsed, qHeld, qFresh = quotaCounter(qKey)
  end
end
loadBuckets()

local reason, retry = 0, 0
if tokN > 0 and held + tokens > tokB then
  reason, retry = 5, -1
elseif qKey and qUsed + tokens > quotaN then
  reason, retry = 4, math.max(qLast * 1000000 - now, 0) * 1000
elseif tokN > 0 and tUsed + tokens > tokB then
  reason, retry = 2, ns((tUsed + tokens - tokB) * tokW / tokN)
end

if reason == 0 and tokens > 0 then
  if tokN > 0 then
    tUsed = tUsed + tokens
    saveBuckets(false, true)
  end
  if qKey then
    qUsed = redis.call('INCRBY', qKey, tokens)
    if qFresh then
      redis.call('EXPIREAT', qKey, qLast + quotaGrace)
    end
  end
  if id ~= '' then
    hold(id, tokens, ttl)
  end
end

-- The standing is of the period at now, as the state script's, which is
-- the period of admission but for a request admitted just before its end.
if quotaN > 0 then
  local cur
  cur, qEnd = period(math.floor(now / 1000000), quotaP)
  if cur ~= name then
    qUsed, qHeld = quotaCounter(KEYS[3] .. cur)
  end
end
local inFlight = redis.call('ZCOUNT', KEYS[2], '(' .. string.format('%.0f', nowMs), '+inf')
local rRem, rReset = standing(rUsed, reqN, reqW, reqB)
local tRem, tReset = standing(tUsed, tokN, tokW, tokB)
return {reason, retry, rRem, rReset, tRem, tReset, qUsed - qHeld, qEnd, inFlight}
