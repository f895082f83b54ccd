-- Cancel (redis_leases.go): undo an admission whose answer its instance
-- did not get, which then refused the request or decided it without
-- Redis (and charges here what it admitted, see Charge). When the
-- admission ran, even if its lease has expired since, its request and
-- its reservation are given back (to the quota of the period at now),
-- and so are the slices it claimed (to the period they were claimed in),
-- and its lease is ended; when it has not run yet, the note of its end
-- makes it refuse when it does.
-- ARGV[10] the lease ID the admission was given, ARGV[11] how long ended
-- leases are noted (ms).
-- Reply: 1 applied, 0 a repeat that changed nothing.
local id, keep = ARGV[10], tonumber(ARGV[11])

local score = redis.call('ZSCORE', KEYS[2], id)
if score and tonumber(score) < 0 then
  return 0
end
-- The note of what the admission reserved and claimed outlives its
-- lease, which a stall longer than the lease's TTL lets expire and
-- another admission drop: the note alone says the admission ran.
local h, claim = held(id)
if score or h then
  if reqN > 0 then
    loadBuckets()
    rUsed = math.max(0, rUsed - 1)
    saveBuckets(true, false)
  end
  if h then
    charge(-h, 0)
  end
  if claim and claim.r then
    -- The slices it claimed were never used: all of them go back.
    giveBackSlice(claim.r, claim.t, claim.name ~= '' and KEYS[3] .. claim.name or nil, claim.t)
  end
end
noteEnded(id, keep)
return 1
