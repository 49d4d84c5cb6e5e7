-- Reserves units of a drop for a batch of claims, one after the other, each exactly as if it
-- ran alone: idempotency replay, then solo_not_allowed (a group-only drop), ended,
-- not_started, limit_reached, sold_out, in the memory engine's order. Redis spends its time
-- per call and per key lookup far more than per field, so everything a batch touches lives
-- in a few hashes of the drop: each is read once (HMGET) before the first claim and written
-- once (HSET/ZADD) after the last; later claims of the batch see earlier ones' writes
-- through local tables. The batch's `claim` ledger records go into ONE stream entry, one
-- run of fields per claim, each run starting with `op` (readers split an entry at each
-- `op`; every other script writes one record per entry). The script is atomic: nobody can
-- see the state in between. A refusal of one claim never touches the others. A batch of one
-- is the single-claim call.
-- KEYS: 1 meta, 2 claims, 3 holds, 4 users, 5 idem (claim idempotency records), 6 uclaims
--       (each user's claim numbers in this drop), 7 ledger
-- ARGV: 1 drop id, 2 how many claim numbers to keep per user (the newest), then per claim i
--       (five each, from 3): user id, idempotency field (`LEN:USER:KEY`), qty, now,
--       idempotency expires_at
-- Reply: one string per claim, in order (one reply object each, cheap to build and parse):
--        'ok|REPLAY|FIRST|CLAIM_ID|TOTAL|REMAINING|RESERVED|SOLD|ENCODED CLAIM' or
--        'err|CODE|DETAIL'. FIRST is 1 for the user's first claim in this drop: the caller
--        then adds the drop to the user's list of drops (another slot).
-- An idempotency record is `qty|expires_at|claim_id`; a dead one (expires_at passed) counts
-- as absent and is overwritten by the next claim with its key. Records are written only
-- with a claim, so there are never more of them than claims.

local meta, claims, holds, users, idem, uclaims, ledger =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local drop, keep = ARGV[1], tonumber(ARGV[2])
local n_claims = (#ARGV - 2) / 5
if #KEYS ~= 7 or n_claims < 1 or n_claims % 1 ~= 0 or not keep or keep < 1 then
  return redis.error_reply('claim: KEYS and ARGV do not describe a batch of claims')
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

-- The claims' users and idempotency fields, in order.
local user_ids, idem_fields = {}, {}
for i = 1, n_claims do
  user_ids[i] = ARGV[3 + 5 * (i - 1)]
  idem_fields[i] = ARGV[4 + 5 * (i - 1)]
end
local idem_read = redis.call('HMGET', idem, unpack(idem_fields))
local held_read = redis.call('HMGET', users, unpack(user_ids))
local list_read = redis.call('HMGET', uclaims, unpack(user_ids))

-- What the batch wrote so far, by field, and the batch's writes in order.
local idem_now = {}    -- idempotency field -> record written by this batch
local held = {}        -- user -> units held now
local lists = {}       -- user -> their claim numbers now ('' for none)
local new_claims = {}  -- claim id -> encoded claim created by this batch
local claims_args, holds_args, idem_args, ledger_args, touched = {}, {}, {}, {}, {}

local function granted(replay, first, cid, enc)
  return 'ok|' .. replay .. '|' .. first .. '|' .. cid .. '|' .. m[1] .. '|' ..
    fmt(remaining) .. '|' .. fmt(reserved) .. '|' .. m[4] .. '|' .. enc
end

-- The newest `keep` numbers of a comma-separated list (only ever that many are read).
local function newest(list)
  local parts = {}
  for x in string.gmatch(list, '[^,]+') do
    parts[#parts + 1] = x
  end
  if #parts <= keep then
    return list
  end
  return table.concat(parts, ',', #parts - keep + 1)
end

local function claim_one(i, user, field, qty_s, now_s, idem_expires)
  local qty, now = tonumber(qty_s), tonumber(now_s)
  local rec = idem_now[field] or idem_read[i]
  if rec then
    local rqty, rexp, rcid = string.match(rec, '^([^|]*)|([^|]*)|(.*)$')
    if not rexp or not tonumber(rexp) then
      return refused('internal', 'corrupt idempotency record')
    end
    if tonumber(rexp) > now then
      if tonumber(rqty) ~= qty then
        return refused('idempotency_mismatch', '')
      end
      local enc = new_claims[rcid] or redis.call('HGET', claims, rcid)
      if not enc then
        return refused('internal', 'idempotency record without claim')
      end
      return granted('1', '0', rcid, enc)
    end
    -- A dead record counts as absent, as the memory engine forgets it.
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
  local h = held[user]
  if h == nil then
    h = tonumber(held_read[i] or '0')
  end
  if h + qty > limit then
    return refused('limit_reached', m[8])
  end
  if remaining < qty then
    return refused('sold_out', '')
  end

  -- Every precondition holds: write.
  local n = next_claim + 1
  local n_s = fmt(n)
  local cid = drop .. '.' .. n_s
  local expires = fmt(now + hold_ms)
  local enc = encode_claim('reserved', qty_s, now_s, expires, user)
  remaining, reserved, next_claim = remaining - qty, reserved + qty, n
  changed = true
  local list = lists[user]
  if list == nil then
    list = list_read[i] or ''
    touched[#touched + 1] = user
  end
  local first = (list == '') and '1' or '0'
  if first == '1' then
    list = n_s
  elseif #list > 24 * keep then
    list = newest(list .. ',' .. n_s)
  else
    list = list .. ',' .. n_s
  end
  lists[user], held[user] = list, h + qty
  new_claims[cid] = enc
  claims_args[#claims_args + 1] = cid
  claims_args[#claims_args + 1] = enc
  holds_args[#holds_args + 1] = expires
  holds_args[#holds_args + 1] = hold_member(n)
  local record = qty_s .. '|' .. idem_expires .. '|' .. cid
  idem_now[field] = record
  idem_args[#idem_args + 1] = field
  idem_args[#idem_args + 1] = record
  local l = #ledger_args
  ledger_args[l + 1], ledger_args[l + 2] = 'op', 'claim'
  ledger_args[l + 3], ledger_args[l + 4] = 'claim_id', cid
  ledger_args[l + 5], ledger_args[l + 6] = 'user', user
  ledger_args[l + 7], ledger_args[l + 8] = 'qty', qty_s
  ledger_args[l + 9], ledger_args[l + 10] = 'ts', now_s
  return granted('0', first, cid, enc)
end

local out = {}
for i = 1, n_claims do
  local a = 3 + 5 * (i - 1)
  out[i] = claim_one(i, ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4])
end
if changed then
  local users_args, lists_args = {}, {}
  for _, user in ipairs(touched) do
    users_args[#users_args + 1] = user
    users_args[#users_args + 1] = fmt(held[user])
    lists_args[#lists_args + 1] = user
    lists_args[#lists_args + 1] = lists[user]
  end
  redis.call('HSET', claims, unpack(claims_args))
  redis.call('ZADD', holds, unpack(holds_args))
  redis.call('HSET', users, unpack(users_args))
  redis.call('HSET', uclaims, unpack(lists_args))
  redis.call('HSET', idem, unpack(idem_args))
  redis.call('XADD', ledger, '*', unpack(ledger_args))
  redis.call('HSET', meta, 'remaining', fmt(remaining), 'reserved', fmt(reserved),
    'next_claim', fmt(next_claim))
end
return out
