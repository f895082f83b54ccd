-- State (redis.go): the client's standing, read only.
-- Reply: requests left and ns until full, tokens left and ns until full,
-- quota used (what slices hold is not) and the period's end in unix seconds, leases in flight.
local inFlight = redis.call('ZCOUNT', KEYS[2], '(' .. string.format('%.0f', nowMs), '+inf')
local qUsed, qEnd = 0, 0
if quotaN > 0 then
  local name
  name, qEnd = period(math.floor(now / 1000000), quotaP)
  local held
  qUsed, held = quotaCounter(KEYS[3] .. name)
  qUsed = qUsed - held
end
loadBuckets()
local rRem, rReset = standing(rUsed, reqN, reqW, reqB)
local tRem, tReset = standing(tUsed, tokN, tokW, tokB)
return {rRem, rReset, tRem, tReset, qUsed, qEnd, inFlight}
