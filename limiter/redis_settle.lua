-- Settle (redis.go): end the lease, and charge the tokens used beyond the
-- reservation (a refund when negative) to the token bucket and to the
-- quota counter of the period of admission.
-- ARGV[10] used - reserved, ARGV[11] lease ID, ARGV[12] its time of
-- admission (unix ms; 0: now), ARGV[13] how long ended leases are noted
-- (ms), ARGV[14] 1 when an earlier attempt of this settle may have landed
-- longer ago than that, ARGV[15] the tokens the instance believes the
-- lease reserved, ARGV[16] requests to charge (what an instance admitted
-- without Redis).
-- What Redis holds reserved for the lease replaces the instance's belief:
-- a Reserve whose answer was lost is given back all the same.
-- Reply: 1 applied, 0 a repeat that changed nothing.
local delta, id, admitted = tonumber(ARGV[10]), ARGV[11], tonumber(ARGV[12])
local keep, unsure = tonumber(ARGV[13]), ARGV[14] == '1'
local believed, requests = tonumber(ARGV[15]) or 0, tonumber(ARGV[16]) or 0

if id ~= '' then
  local score = redis.call('ZSCORE', KEYS[2], id)
  if score and tonumber(score) < 0 then
    return 0
  end
  local h = held(id)
  if h then
    delta = delta + believed - h
  end
  noteEnded(id, keep)
  -- A lease neither running nor noted expired (its instance stopped
  -- renewing it) or was settled before the note's time: charge, which
  -- a repeat makes too much, but never refund, which a repeat would
  -- give away.
  if not score and unsure then
    delta = math.max(delta, 0)
  end
end
if requests > 0 and reqN > 0 then
  loadBuckets()
  rUsed = rUsed + requests
  saveBuckets(true, false)
end
charge(delta, admitted)
return 1
