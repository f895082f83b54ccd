-- Give back (redis_slices.go): what an instance did not use of the slices
-- of a client's buckets and quota it claimed.
-- ARGV[10] requests, ARGV[11] tokens unused, ARGV[12] tokens claimed,
-- ARGV[13] the time of the claim (unix ms): its quota period is the one
-- given back to, unless that counter is gone for good. ARGV[14] the ID
-- of the admission that claimed the slices, ARGV[15] how long ended
-- leases are noted (ms): a give-back is noted as one, so that a repeat
-- (a retry of one whose answer was lost) changes nothing. Without an ID
-- (what requests refunded to a slice whose claim failed), it is not
-- retried, and not noted.
-- Reply: 1 applied, 0 a repeat that changed nothing.
local r, t, c, at = tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13])
local id, keep = ARGV[14], tonumber(ARGV[15])
if id ~= '' then
  if redis.call('ZSCORE', KEYS[2], id .. '/g') then
    return 0
  end
  noteEnded(id .. '/g', keep)
end
local qKey = nil
if quotaN > 0 and at > 0 then
  local name, last = period(math.floor(at / 1000), quotaP)
  if last + quotaGrace > now / 1000000 then
    qKey = KEYS[3] .. name
  end
end
giveBackSlice(r, t, qKey, c)
return 1
