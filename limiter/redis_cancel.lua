-- Cancel (redis_leases.go): free the slot of an admission whose answer
-- its instance did not get, which then decided without Redis. When the
-- admission ran, its lease is ended; when it has not run yet, the note of
-- its end makes it refuse when it does. The request stays counted, and its
-- reservation charged: the instance served it, and its Settle goes to the
-- instance's own limits, not here.
-- ARGV[10] the lease ID the admission was given, ARGV[11] how long ended
-- leases are noted (ms).
-- Reply: 1 applied, 0 a repeat that changed nothing.
local id, keep = ARGV[10], tonumber(ARGV[11])

local score = redis.call('ZSCORE', KEYS[2], id)
if score and tonumber(score) < 0 then
  return 0
end
noteEnded(id, keep)
return 1
