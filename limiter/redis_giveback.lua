-- Give back (redis_slices.go): what an instance did not use of the slices
-- of a client's buckets it claimed. Tokens below zero are tokens its
-- requests used beyond what they reserved from the slice: charged.
-- ARGV[10] requests, ARGV[11] tokens.
-- Reply: 1.
local r, t = tonumber(ARGV[10]), tonumber(ARGV[11])
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
return 1
