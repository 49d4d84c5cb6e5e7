-- Creates a drop with all its stock remaining and logs `create`.
-- KEYS: 1 meta, 2 ledger
-- ARGV: 1 drop json, 2 stock, 3 starts_at, 4 ends_at ('' = none), 5 per-user limit,
--       6 hold in ms, 7 created_at, 8 group size ('' = not a group drop), 9 group price,
--       10 group window in ms, 11 solo claims allowed ('1'/'0')
local meta, ledger = KEYS[1], KEYS[2]
if redis.call('EXISTS', meta) == 1 then
  return refuse('drop_exists', '')
end
redis.call('HSET', meta,
  'drop', ARGV[1], 'total', ARGV[2], 'remaining', ARGV[2], 'reserved', '0', 'sold', '0',
  'ended', '0', 'next_claim', '0', 'starts_at', ARGV[3], 'ends_at', ARGV[4],
  'limit', ARGV[5], 'hold_ms', ARGV[6], 'next_group', '0', 'gsize', ARGV[8],
  'gprice', ARGV[9], 'gwindow_ms', ARGV[10], 'solo', ARGV[11])
redis.call('XADD', ledger, '*', 'op', 'create', 'qty', ARGV[2], 'ts', ARGV[7])
return {'ok'}
