-- The beginning of every Lua script of the Redis limiter (redis.go): the
-- clock, the limits, the debt-capable token buckets of bucket.go and UTC
-- calendar periods. Each script is this file followed by its own.
--
-- KEYS: 1 the client's buckets, 2 its leases, 3 its quota counter without
-- the period (the script appends it: the key shares the client's hash
-- tag, so it lives in the same cluster slot as the others), 4 the tokens
-- its running leases hold reserved, by lease ID.
-- ARGV 1-9, the tier's limits, 0 where unlimited: requests n, window in
-- nanoseconds, burst; tokens n, window, burst; concurrent (-1: the request
-- takes no slot, see Limits.NoSlot); quota n, period
-- (1 day, 2 month). A script's own arguments follow from ARGV[10].

-- Redis' own clock, the same for every instance: microseconds.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local nowMs = math.floor(now / 1000)

local reqN, reqW, reqB = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokN, tokW, tokB = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local concurrent = tonumber(ARGV[7])
local quotaN, quotaP = tonumber(ARGV[8]), tonumber(ARGV[9])

-- ns rounds a duration in nanoseconds up, as bucket.go's nanos does, and
-- caps it so that it fits an int64 reply.
local function ns(x)
  return math.min(math.ceil(x), 9e18)
end

-- The buckets, a hash: units below full (r, t; above the burst is debt)
-- at a time in microseconds (ra, ta). A missing bucket is full.
local rUsed, rAt, tUsed, tAt = 0, now, 0, now

-- refill returns a stored bucket's units below full at now, and their time.
local function refill(used, at, n, window)
  used, at = tonumber(used) or 0, tonumber(at) or now
  if now > at then
    return math.max(0, used - (now - at) * 1000 * n / window), now
  end
  return used, at
end

local function loadBuckets()
  local v = redis.call('HMGET', KEYS[1], 'r', 'ra', 't', 'ta')
  if reqN > 0 then
    rUsed, rAt = refill(v[1], v[2], reqN, reqW)
  end
  if tokN > 0 then
    tUsed, tAt = refill(v[3], v[4], tokN, tokW)
  end
end

-- fullIn returns the microseconds from now until a bucket is full.
local function fullIn(used, at, n, window)
  if n <= 0 or used <= 0 then
    return 0
  end
  return at + used * window / n / 1000 - now
end

-- saveBuckets stores the buckets named until both are full again, when
-- forgetting them loses nothing.
local function saveBuckets(req, tok)
  local ttl = math.max(fullIn(rUsed, rAt, reqN, reqW), fullIn(tUsed, tAt, tokN, tokW))
  if ttl <= 0 then
    redis.call('DEL', KEYS[1])
    return
  end
  if req and tok then
    redis.call('HSET', KEYS[1], 'r', rUsed, 'ra', rAt, 't', tUsed, 'ta', tAt)
  elseif req then
    redis.call('HSET', KEYS[1], 'r', rUsed, 'ra', rAt)
  elseif tok then
    redis.call('HSET', KEYS[1], 't', tUsed, 'ta', tAt)
  end
  redis.call('PEXPIRE', KEYS[1], math.min(math.ceil(ttl / 1000), 1e15))
end

-- standing returns the units left and the nanoseconds until full.
local function standing(used, n, window, burst)
  if n <= 0 then
    return 0, 0
  end
  return math.floor(math.max(burst - used, 0)), ns(used * window / n)
end

local monthDays = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31}

-- period returns the name of the UTC day (kind 1: YYYY-MM-DD) or month
-- (kind 2: YYYY-MM) holding the unix second sec, and its end in unix
-- seconds. The date is H. Hinnant's civil_from_days.
local function period(sec, kind)
  local days = math.floor(sec / 86400)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then
    y = y + 1
  end
  if kind == 1 then
    return string.format('%04d-%02d-%02d', y, m, d), (days + 1) * 86400
  end
  local len = monthDays[m]
  if m == 2 and y % 4 == 0 and (y % 100 ~= 0 or y % 400 == 0) then
    len = 29
  end
  return string.format('%04d-%02d', y, m), (days - d + 1 + len) * 86400
end

-- A quota counter outlives its period by a day, for the requests that
-- settle after it ends.
local quotaGrace = 86400

-- The lease set (KEYS[2]) holds the ID of each running request's lease,
-- scored by its expiry in unix ms (renewed while the request runs), and
-- notes of what ended lately, scored by minus the time they were written:
-- the IDs of settled leases and of cancelled admissions. A settle that is
-- repeated, a renewal late for its lease and an admission that runs after
-- its cancellation find them, and change nothing. Live leases are the positive scores, so the notes are
-- never counted in flight.
local function fmt(ms)
  return string.format('%.0f', ms)
end

-- noteEnded notes id as ended at now, keeps the notes keep ms, and drops
-- those older.
local function noteEnded(id, keep)
  redis.call('ZADD', KEYS[2], -nowMs, id)
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '(' .. fmt(keep - nowMs), '(0')
  if redis.call('PTTL', KEYS[2]) < keep then
    redis.call('PEXPIRE', KEYS[2], keep)
  end
end

-- hold notes n more tokens reserved by the lease id, kept as long as the
-- lease set (renewals extend both), and at least ttl ms: a request from a
-- slice may have no lease in the set.
local function hold(id, n, ttl)
  redis.call('HINCRBY', KEYS[4], id, n)
  local keep = math.max(redis.call('PTTL', KEYS[2]), ttl)
  if keep > 0 and redis.call('PTTL', KEYS[4]) < keep then
    redis.call('PEXPIRE', KEYS[4], keep)
  end
end

-- noteClaim notes beside the lease id's reservation the slices its
-- admission claimed: r requests, t tokens, of the quota period name ('':
-- none), for a cancellation to give back, as the admission's answer may
-- never reach its instance. The lease's settle forgets it.
local function noteClaim(id, r, t, name)
  redis.call('HSET', KEYS[4], id .. '/c', fmt(r) .. ' ' .. fmt(t) .. ' ' .. name)
end

-- held returns the tokens the lease id holds reserved, as Redis counted
-- them, and the slices its admission claimed (noteClaim: requests,
-- tokens, quota period name), and forgets both; nil when Redis holds none
-- for it.
local function held(id)
  local v = redis.call('HMGET', KEYS[4], id, id .. '/c')
  if not v[1] then
    return nil
  end
  redis.call('HDEL', KEYS[4], id, id .. '/c')
  if not v[2] then
    return tonumber(v[1])
  end
  local r, t, name = string.match(v[2], '^(%d+) (%d+) (.*)$')
  return tonumber(v[1]), {r = tonumber(r), t = tonumber(t), name = name}
end

-- Beside a quota counter, which counts what instances' slices hold
-- (redis_slices.go) as used, a counter of what they hold: the standing
-- reported is the counter less it.
local slicedSuffix = ':sliced'

-- quotaCounter returns a quota counter, what slices hold of it, and
-- whether it is new.
local function quotaCounter(key)
  local v = redis.call('MGET', key, key .. slicedSuffix)
  return tonumber(v[1]) or 0, tonumber(v[2]) or 0, not v[1]
end

-- giveBackSlice gives back what a slice did not use: r requests and t
-- tokens to the buckets, and t tokens to the quota counter qKey (nil
-- without a quota, or once the counter is gone for good), of which the
-- slice claimed c. A counter at zero or below is the same as none, and
-- is dropped rather than left without its expiry.
local function giveBackSlice(r, t, qKey, c)
  loadBuckets()
  local req, tok = reqN > 0 and r ~= 0, tokN > 0 and t ~= 0
  if req then
    rUsed = math.max(0, rUsed - r)
  end
  if tok then
    tUsed = math.max(0, tUsed - t)
  end
  if req or tok then
    saveBuckets(req, tok)
  end
  if qKey then
    if t ~= 0 and redis.call('INCRBY', qKey, -t) <= 0 then
      redis.call('DEL', qKey)
    end
    if c ~= 0 and redis.call('INCRBY', qKey .. slicedSuffix, -c) <= 0 then
      redis.call('DEL', qKey .. slicedSuffix)
    end
  end
end

-- charge adds delta tokens (a refund when negative) to the token bucket,
-- into debt if need be, and to the quota counter of the period holding
-- admitted (unix ms; 0: now).
local function charge(delta, admitted)
  if delta == 0 then
    return
  end
  if tokN > 0 then
    loadBuckets()
    tUsed = math.max(0, tUsed + delta)
    saveBuckets(false, true)
  end
  if quotaN > 0 then
    local name, last = period(math.floor((admitted > 0 and admitted or nowMs) / 1000), quotaP)
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
end
