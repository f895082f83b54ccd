-- Cancel (redis_leases.go): undo the admission of a request whose Admit
-- reply its instance did not get, which then decided without Redis. When
-- the admission ran, its lease is ended as a settle of nothing used ends
-- it; when it has not run yet, a marker makes it refuse when it does. The
-- request stays counted: the instance served it.
-- ARGV[10] the admission's nonce, ARGV[11] the tokens it reserved,
-- ARGV[12] how long ended leases are noted (ms).
-- Reply: 1 applied, 0 a repeat that changed nothing.
local nonce, reserve, keep = ARGV[10], tonumber(ARGV[11]), tonumber(ARGV[12])

local marker = 'x:' .. nonce
if redis.call('ZSCORE', KEYS[2], marker) then
  return 0
end
noteEnded(marker, keep)
local cursor = '0'
repeat
  local page = redis.call('ZSCAN', KEYS[2], cursor, 'MATCH', nonce .. ':*')
  cursor = page[1]
  local found = page[2]
  if #found > 0 then
    if tonumber(found[2]) > 0 then
      noteEnded(found[1], keep)
      charge(-reserve, admittedAt(found[1]))
    end
    return 1
  end
until cursor == '0'
return 1
