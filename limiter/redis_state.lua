-- State (redis.go): the client's standing, read only.
-- Reply: requests left and ns until full, tokens left and ns until full,
-- quota used and the period's end in unix seconds, leases in flight.
local inFlight = redis.call('ZCOUNT', KEYS[2], '(' .. string.format('%.0f', nowMs), '+inf')
local qUsed, qEnd = 0, 0
if quotaN > 0 then
  local name
  name, qEnd = period(math.floor(now / 1000000), quotaP)
  qUsed = tonumber(redis.call('GET', KEYS[3] .. name)) or 0
end
loadBuckets()
local rRem, rReset = standing(rUsed, reqN, reqW, reqB)
local tRem, tReset = standing(tUsed, tokN, tokW, tokB)
return {rRem, rReset, tRem, tReset, qUsed, qEnd, inFlight}
