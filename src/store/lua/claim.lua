-- Reserves units of a drop: idempotency replay, then solo_not_allowed (a group-only
-- drop), ended, not_started, limit_reached,
-- sold_out, in the memory engine's order; on success writes the claim, its hold, the
-- user's count, the idempotency record and the `claim` ledger entry.
-- KEYS: 1 meta, 2 claims, 3 holds, 4 users, 5 idempotency record, 6 ledger
-- ARGV: 1 drop id, 2 user id, 3 qty, 4 now, 5 idempotency expires_at, 6 record ttl in ms
local meta, claims, holds, users, idem, ledger = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local drop, user, qty_s, now_s = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local qty, now = tonumber(qty_s), tonumber(now_s)

local m = redis.call('HMGET', meta, 'total', 'remaining', 'reserved', 'sold', 'ended',
  'starts_at', 'ends_at', 'limit', 'hold_ms', 'next_claim', 'solo')
if not m[1] then
  return refuse('not_found', 'drop')
end

local rec = redis.call('GET', idem)
if rec then
  local rqty, rexp, rcid = string.match(rec, '^([^|]*)|([^|]*)|(.*)$')
  if not rexp or not tonumber(rexp) then
    return refuse('internal', 'corrupt idempotency record')
  end
  if tonumber(rexp) > now then
    if tonumber(rqty) ~= qty then
      return refuse('idempotency_mismatch', '')
    end
    local enc = redis.call('HGET', claims, rcid)
    if not enc then
      return refuse('internal', 'idempotency record without claim')
    end
    return {'ok', '1', rcid, enc, m[1], m[2], m[3], m[4]}
  end
  -- A dead record is forgotten, as the memory engine does; this is not a transition and
  -- leaves the drop consistent whatever happens next.
  redis.call('DEL', idem)
end

if m[11] == '0' then
  return refuse('solo_not_allowed', '')
end
local refused = window_refusal(m[5], m[6], m[7], now)
if refused then
  return refused
end
local held = tonumber(redis.call('HGET', users, user) or '0')
local remaining = tonumber(m[2])
refused = units_refusal(held, qty, m[8], remaining)
if refused then
  return refused
end

-- Every precondition holds: write.
local n = tonumber(m[10]) + 1
local cid = drop .. '.' .. fmt(n)
local expires = fmt(now + tonumber(m[9]))
local reserved = tonumber(m[3]) + qty
remaining = remaining - qty
local enc = encode_claim('reserved', qty_s, now_s, expires, user)
redis.call('HSET', meta, 'remaining', fmt(remaining), 'reserved', fmt(reserved), 'next_claim', fmt(n))
redis.call('HSET', users, user, fmt(held + qty))
redis.call('ZADD', holds, expires, hold_member(n))
redis.call('HSET', claims, cid, enc)
redis.call('SET', idem, qty_s .. '|' .. ARGV[5] .. '|' .. cid, 'PX', ARGV[6])
redis.call('XADD', ledger, '*', 'op', 'claim', 'claim_id', cid, 'user', user, 'qty', qty_s, 'ts', now_s)
return {'ok', '0', cid, enc, m[1], fmt(remaining), fmt(reserved), m[4]}
