-- Gives a reservation back to stock and logs `release`. Releasing a released claim answers
-- it again.
-- KEYS: 1 meta, 2 claims, 3 holds, 4 users, 5 ledger
-- ARGV: 1 claim id, 2 user id, 3 now, 4 hold member
local meta, claims, holds, users, ledger = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local cid, user, now_s = ARGV[1], ARGV[2], ARGV[3]

local c, m, reply = claim_for_transition(meta, claims, cid, user, 'released')
if reply then
  return reply
end

local qty = tonumber(c.qty)
local remaining = tonumber(m[2]) + qty
local reserved = tonumber(m[3]) - qty
local held = tonumber(redis.call('HGET', users, c.user) or '0') - qty
local enc = encode_claim('released', c.qty, c.created, c.expires, c.user)
redis.call('HSET', meta, 'remaining', fmt(remaining), 'reserved', fmt(reserved))
set_held(users, c.user, held)
redis.call('ZREM', holds, ARGV[4])
redis.call('HSET', claims, cid, enc)
redis.call('XADD', ledger, '*', 'op', 'release', 'claim_id', cid, 'user', c.user, 'qty', c.qty, 'ts', now_s)
return {'ok', enc, m[1], fmt(remaining), fmt(reserved), m[4]}
