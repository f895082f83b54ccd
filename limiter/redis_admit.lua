-- Admit (redis.go): check every limit in the order of memory.go and, when
-- all pass, count the request, reserve the tokens against the bucket and
-- the quota, and add a lease. A refusal writes nothing.
-- ARGV[10] reserve, ARGV[11] lease TTL in ms, ARGV[12] lease ID (random),
-- ARGV[13] the grace in ms: how long before now a lease may have expired
-- and still count (see leaseGrace in redis_leases.go; 0 but after Redis
-- was silent long enough for running requests' leases to expire).
-- ARGV[14] and [15], optional, the requests and tokens of the slices an
-- instance claims (redis_slices.go): taken from the buckets, and the
-- tokens from the quota counter too, after the request's own when the
-- request is admitted and they fit, not at all otherwise. Of a quota, a
-- slice is claimed only while it leaves quotaFloor slices unclaimed and
-- the period has quotaMinLeft to run: the last of a quota, and the last
-- seconds of a period, are decided here, exactly.
-- Reply: reason (limiter.Reason), retry after (ns, -1: never), the time
-- of admission (unix ms; 0 when refused), then the standing as the state
-- script's, then, when a slice was asked for, the requests and tokens
-- claimed; or -1 alone for an admission cancelled before it ran.
local reserve, ttl, id = tonumber(ARGV[10]), tonumber(ARGV[11]), ARGV[12]
local live = string.format('%.0f', nowMs - tonumber(ARGV[13]))
local claimR, claimT = tonumber(ARGV[14]) or 0, tonumber(ARGV[15]) or 0
local sliced = ARGV[14] ~= nil
local quotaFloor, quotaMinLeft = 10, 2000000 -- slices; µs

if redis.call('ZSCORE', KEYS[2], id) then
  return {-1}
end

-- Leases past their expiry (and the grace) are of instances that died,
-- or stopped renewing them: not counted.
local inFlight = redis.call('ZCOUNT', KEYS[2], '(' .. live, '+inf')
local qKey, qName, qUsed, qHeld, qEnd, qFresh = nil, '', 0, 0, 0, false
if quotaN > 0 then
  qName, qEnd = period(math.floor(now / 1000000), quotaP)
  qKey = KEYS[3] .. qName
  qUsed, qHeld, qFresh = quotaCounter(qKey)
end
loadBuckets()

-- limiter.Reason: 0 admitted, 1 requests, 2 tokens, 3 concurrency,
-- 4 quota, 5 too large.
local reason, retry = 0, 0
if tokN > 0 and reserve > tokB then
  reason, retry = 5, -1
elseif concurrent > 0 and inFlight >= concurrent then
  reason, retry = 3, 1000000000
elseif quotaN > 0 and qUsed + reserve > quotaN then
  reason, retry = 4, (qEnd * 1000000 - now) * 1000
elseif reqN > 0 and rUsed + 1 > reqB then
  reason, retry = 1, ns((rUsed + 1 - reqB) * reqW / reqN)
elseif tokN > 0 and tUsed + reserve > tokB then
  reason, retry = 2, ns((tUsed + reserve - tokB) * tokW / tokN)
end

local admitted, gotR, gotT = 0, 0, 0
if reason == 0 then
  local req, tok = reqN > 0, tokN > 0 and reserve > 0
  if req then
    rUsed = rUsed + 1
  end
  if tok then
    tUsed = tUsed + reserve
  end
  if (claimR > 0 or claimT > 0) and (reqN == 0 or rUsed + claimR <= reqB) and (tokN == 0 or tUsed + claimT <= tokB) and
    (quotaN == 0 or qUsed + reserve + claimT * (1 + quotaFloor) <= quotaN and qEnd * 1000000 - now >= quotaMinLeft) then
    if reqN > 0 and claimR > 0 then
      rUsed, gotR, req = rUsed + claimR, claimR, true
    end
    if claimT > 0 and (tokN > 0 or quotaN > 0) then
      gotT = claimT
      if tokN > 0 then
        tUsed, tok = tUsed + claimT, true
      end
    end
  end
  if req or tok then
    saveBuckets(req, tok)
  end
  local qAdd = reserve
  if quotaN > 0 then
    qAdd = reserve + gotT
  end
  if quotaN > 0 and qAdd > 0 then
    qUsed = redis.call('INCRBY', qKey, qAdd)
    if qFresh then
      redis.call('EXPIREAT', qKey, qEnd + quotaGrace)
    end
    if gotT > 0 then
      qHeld = redis.call('INCRBY', qKey .. slicedSuffix, gotT)
      if qHeld == gotT then
        redis.call('EXPIREAT', qKey .. slicedSuffix, qEnd + quotaGrace)
      end
    end
  end
  -- The time of admission names the quota period that Reserve and
  -- Settle correct. The set lives as long as its last lease. A request
  -- that takes no slot (concurrent -1) holds no lease.
  admitted = nowMs
  if concurrent >= 0 then
    local expiry = nowMs + ttl
    redis.call('ZREMRANGEBYSCORE', KEYS[2], 1, live)
    redis.call('ZADD', KEYS[2], expiry, id)
    if redis.call('PTTL', KEYS[2]) < ttl then
      redis.call('PEXPIREAT', KEYS[2], expiry)
    end
    if gotR > 0 or gotT > 0 then
      hold(id, reserve, ttl) -- even 0: the note is forgotten with it
      noteClaim(id, gotR, gotT, gotT > 0 and qName or '')
    elseif reserve > 0 then
      hold(id, reserve, ttl)
    end
    inFlight = inFlight + 1
  end
end

local rRem, rReset = standing(rUsed, reqN, reqW, reqB)
local tRem, tReset = standing(tUsed, tokN, tokW, tokB)
if sliced then
  return {reason, retry, admitted, rRem, rReset, tRem, tReset, qUsed - qHeld, qEnd, inFlight, gotR, gotT}
end
return {reason, retry, admitted, rRem, rReset, tRem, tReset, qUsed - qHeld, qEnd, inFlight}
