-- Ends a drop (once: the `end` ledger entry is written only by the first call).
-- KEYS: 1 meta, 2 ledger
-- ARGV: 1 now
local meta, ledger = KEYS[1], KEYS[2]
local m = redis.call('HMGET', meta, 'drop', 'total', 'remaining', 'reserved', 'sold', 'ended')
if not m[1] then
  return refuse('not_found', 'drop')
end
if m[6] ~= '1' then
  redis.call('HSET', meta, 'ended', '1')
  redis.call('XADD', ledger, '*', 'op', 'end', 'qty', '0', 'ts', ARGV[1])
end
return {'ok', m[1], m[2], m[3], m[4], m[5], '1'}
