-- Reserves units of a drop for a batch of claims, one after the other, each exactly as if it
-- ran alone: idempotency replay, then solo_not_allowed (a group-only drop), ended,
-- not_started, limit_reached, sold_out, in the memory engine's order; on success writes the
-- claim, its hold, the user's count, the user's index of their claims in this drop, the
-- idempotency record and the `claim` ledger entry before the next claim is looked at. A
-- refusal of one claim never touches the others. The drop's counters move in locals and
-- are written to meta once, after the last claim: the script is atomic, so nobody can see
-- them in between. A batch of one is the single-claim call.
-- KEYS: 1 meta, 2 claims, 3 holds, 4 users, then per claim i two keys: the idempotency
--       record and the user's claim list in this drop (`uc:USER`); last the ledger
-- ARGV: 1 drop id, then per claim i (five each, from 2): user id, qty, now,
--       idempotency expires_at, record ttl in ms
-- Reply: one string per claim, in order (one reply object each, cheap to build and parse):
--        'ok|REPLAY|FIRST|CLAIM_ID|TOTAL|REMAINING|RESERVED|SOLD|ENCODED CLAIM' or
--        'err|CODE|DETAIL'. FIRST is 1 for the user's first claim in this drop: the caller
--        then adds the drop to the user's list of drops (another slot).

local meta, claims, holds, users = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local n_claims = (#KEYS - 5) / 2
local ledger = KEYS[#KEYS]
local drop = ARGV[1]
if n_claims < 1 or n_claims % 1 ~= 0 or #ARGV ~= 1 + 5 * n_claims then
  return redis.error_reply('claim: KEYS and ARGV do not describe the same claims')
end

local m = redis.call('HMGET', meta, 'total', 'remaining', 'reserved', 'sold', 'ended',
  'starts_at', 'ends_at', 'limit', 'hold_ms', 'next_claim', 'solo')
local function refused(code, detail)
  return 'err|' .. code .. '|' .. (detail or '')
end

if not m[1] then
  local out = {}
  for i = 1, n_claims do
    out[i] = refused('not_found', 'drop')
  end
  return out
end
-- Counters move as the batch goes; every write below keeps meta equal to them.
local remaining, reserved, next_claim = tonumber(m[2]), tonumber(m[3]), tonumber(m[10])
local limit, hold_ms, starts_at = tonumber(m[8]), tonumber(m[9]), tonumber(m[6])
local ends_at = (m[7] ~= '') and tonumber(m[7]) or nil
local changed = false

local function granted(replay, first, cid, enc)
  return 'ok|' .. replay .. '|' .. first .. '|' .. cid .. '|' .. m[1] .. '|' ..
    fmt(remaining) .. '|' .. fmt(reserved) .. '|' .. m[4] .. '|' .. enc
end

local function claim_one(idem, uc, user, qty_s, now_s, idem_expires, ttl)
  local qty, now = tonumber(qty_s), tonumber(now_s)
  local rec = redis.call('GET', idem)
  if rec then
    local rqty, rexp, rcid = string.match(rec, '^([^|]*)|([^|]*)|(.*)$')
    if not rexp or not tonumber(rexp) then
      return refused('internal', 'corrupt idempotency record')
    end
    if tonumber(rexp) > now then
      if tonumber(rqty) ~= qty then
        return refused('idempotency_mismatch', '')
      end
      local enc = redis.call('HGET', claims, rcid)
      if not enc then
        return refused('internal', 'idempotency record without claim')
      end
      return granted('1', '0', rcid, enc)
    end
    -- A dead record is forgotten, as the memory engine does; this is not a transition and
    -- leaves the drop consistent whatever happens next.
    redis.call('DEL', idem)
  end

  if m[11] == '0' then
    return refused('solo_not_allowed', '')
  end
  if m[5] == '1' or (ends_at and now >= ends_at) then
    return refused('ended', '')
  end
  if now < starts_at then
    return refused('not_started', '')
  end
  local held = tonumber(redis.call('HGET', users, user) or '0')
  if held + qty > limit then
    return refused('limit_reached', m[8])
  end
  if remaining < qty then
    return refused('sold_out', '')
  end

  -- Every precondition holds: write.
  local n = next_claim + 1
  local cid = drop .. '.' .. fmt(n)
  local expires = fmt(now + hold_ms)
  local enc = encode_claim('reserved', qty_s, now_s, expires, user)
  remaining, reserved, next_claim = remaining - qty, reserved + qty, n
  changed = true
  redis.call('HSET', users, user, fmt(held + qty))
  redis.call('ZADD', holds, expires, hold_member(n))
  redis.call('HSET', claims, cid, enc)
  local first = redis.call('RPUSH', uc, fmt(n)) == 1 and '1' or '0'
  redis.call('SET', idem, qty_s .. '|' .. idem_expires .. '|' .. cid, 'PX', ttl)
  redis.call('XADD', ledger, '*', 'op', 'claim', 'claim_id', cid, 'user', user, 'qty', qty_s,
    'ts', now_s)
  return granted('0', first, cid, enc)
end

local out = {}
for i = 1, n_claims do
  local a = 2 + 5 * (i - 1)
  out[i] = claim_one(KEYS[3 + 2 * i], KEYS[4 + 2 * i], ARGV[a], ARGV[a + 1], ARGV[a + 2],
    ARGV[a + 3], ARGV[a + 4])
end
if changed then
  redis.call('HSET', meta, 'remaining', fmt(remaining), 'reserved', fmt(reserved),
    'next_claim', fmt(next_claim))
end
return out
