-- Payment done: a reserved, unexpired claim becomes sold and logs `confirm`.
-- Confirming a sold claim answers it again.
-- KEYS: 1 meta, 2 claims, 3 holds, 4 ledger
-- ARGV: 1 claim id, 2 user id, 3 now, 4 hold member
local meta, claims, holds, ledger = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local cid, user, now_s = ARGV[1], ARGV[2], ARGV[3]

local c, m, reply = claim_for_transition(meta, claims, cid, user, 'sold')
if reply then
  return reply
end
if tonumber(now_s) >= tonumber(c.expires) then
  return refuse('claim_expired', '')
end

local qty = tonumber(c.qty)
local reserved = tonumber(m[3]) - qty
local sold = tonumber(m[4]) + qty
local enc = encode_claim('sold', c.qty, c.created, c.expires, c.user)
redis.call('HSET', meta, 'reserved', fmt(reserved), 'sold', fmt(sold))
redis.call('ZREM', holds, ARGV[4])
redis.call('HSET', claims, cid, enc)
redis.call('XADD', ledger, '*', 'op', 'confirm', 'claim_id', cid, 'user', c.user, 'qty', c.qty, 'ts', now_s)
return {'ok', enc, m[1], m[2], fmt(reserved), fmt(sold)}
