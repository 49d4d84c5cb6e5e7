-- Gives a reservation back to stock and logs `release`. Releasing a released claim answers
-- it again.
-- KEYS: 1 meta, 2 claims, 3 holds, 4 users, 5 ledger
-- ARGV: 1 claim id, 2 user id, 3 now, 4 hold member
local meta, claims, holds, users, ledger = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local cid, user, now_s = ARGV[1], ARGV[2], ARGV[3]

local enc = redis.call('HGET', claims, cid)
if not enc then
  return refuse('not_found', 'claim')
end
local c = decode_claim(enc)
if not c then
  return refuse('internal', 'corrupt claim record')
end
if c.user ~= user then
  return refuse('forbidden', '')
end
local m = levels(meta)
if not m[1] then
  return refuse('internal', 'claim without drop')
end
if c.status == 'released' then
  return {'ok', enc, m[1], m[2], m[3], m[4]}
end
if c.status == 'sold' or c.status == 'expired' then
  return refuse('claim_closed', c.status)
end
if c.status ~= 'reserved' then
  return refuse('internal', 'unknown claim status')
end

local qty = tonumber(c.qty)
local remaining = tonumber(m[2]) + qty
local reserved = tonumber(m[3]) - qty
local held = tonumber(redis.call('HGET', users, c.user) or '0') - qty
enc = encode_claim('released', c.qty, c.created, c.expires, c.user)
redis.call('HSET', meta, 'remaining', fmt(remaining), 'reserved', fmt(reserved))
set_held(users, c.user, held)
redis.call('ZREM', holds, ARGV[4])
redis.call('HSET', claims, cid, enc)
redis.call('XADD', ledger, '*', 'op', 'release', 'claim_id', cid, 'user', c.user, 'qty', c.qty, 'ts', now_s)
return {'ok', enc, m[1], fmt(remaining), fmt(reserved), m[4]}
