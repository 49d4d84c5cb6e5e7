-- Shared helpers, prepended to every drop/room script by src/store/redis.rs.
-- Numbers: every counter and timestamp arrives as a decimal string (ARGV or Redis) and is
-- written back with string.format('%d') so it never turns into a float such as 1e+15.
local function fmt(n)
  return string.format('%d', n)
end

-- A domain refusal: {'err', code, detail}. Not a Lua error: nothing is rolled back because
-- every script returns a refusal before its first write.
local function refuse(code, detail)
  return {'err', code, detail or ''}
end

-- A claim is stored as "status|qty|created_at|expires_at|user" (user last: it may hold '|').
local function encode_claim(status, qty, created, expires, user)
  return status .. '|' .. qty .. '|' .. created .. '|' .. expires .. '|' .. user
end

local function decode_claim(enc)
  local status, qty, created, expires, user =
    string.match(enc, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
  if not status or not tonumber(qty) or not tonumber(expires) then
    return nil
  end
  return {status = status, qty = qty, created = created, expires = expires, user = user}
end

-- The holds zset member of claim number n: zero-padded so equal deadlines sort by number,
-- exactly like the memory engine's (expires_at, n) order.
local function hold_member(n)
  return string.format('%020d', n)
end

local function levels(meta)
  return redis.call('HMGET', meta, 'total', 'remaining', 'reserved', 'sold')
end

-- `ended` or `not_started` when the sale window (meta `ended`, `starts_at`, `ends_at`)
-- does not include `now`; nil when it does. `starts_at` nil skips the start check.
local function window_refusal(ended, starts_at, ends_at, now)
  if ended == '1' or (ends_at ~= '' and now >= tonumber(ends_at)) then
    return refuse('ended', '')
  end
  if starts_at and now < tonumber(starts_at) then
    return refuse('not_started', '')
  end
  return nil
end

-- `limit_reached` or `sold_out` when a user holding `held` units cannot take `qty` more;
-- nil when they can.
local function units_refusal(held, qty, limit, remaining)
  if held + qty > tonumber(limit) then
    return refuse('limit_reached', limit)
  end
  if remaining < qty then
    return refuse('sold_out', '')
  end
  return nil
end

-- Writes a user's held units back (removing the field at zero).
local function set_held(users, user, held)
  if held > 0 then
    redis.call('HSET', users, user, fmt(held))
  else
    redis.call('HDEL', users, user)
  end
end

-- The checks a user's transition of a claim (confirm: to 'sold', release: to 'released')
-- shares. Returns the claim and the drop's levels when it may proceed, or else a reply to
-- return at once: the refusal, or the claim as it is when it already reached `target` (a
-- retried call answers the same).
local function claim_for_transition(meta, claims, cid, user, target)
  local enc = redis.call('HGET', claims, cid)
  if not enc then
    return nil, nil, refuse('not_found', 'claim')
  end
  local c = decode_claim(enc)
  if not c then
    return nil, nil, refuse('internal', 'corrupt claim record')
  end
  if c.user ~= user then
    return nil, nil, refuse('forbidden', '')
  end
  local m = levels(meta)
  if not m[1] then
    return nil, nil, refuse('internal', 'claim without drop')
  end
  if c.status == target then
    return nil, nil, {'ok', enc, m[1], m[2], m[3], m[4]}
  end
  if c.status == 'sold' or c.status == 'released' or c.status == 'expired' then
    return nil, nil, refuse('claim_closed', c.status)
  end
  if c.status ~= 'reserved' then
    return nil, nil, refuse('internal', 'unknown claim status')
  end
  return c, m, nil
end
