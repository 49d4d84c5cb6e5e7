-- Expires at most ARGV[3] reservations whose hold passed `now`, oldest deadline first, and
-- logs one `expire` per claim. Only claims still `reserved` are expired, so concurrent
-- sweepers expire each claim exactly once (the script is atomic; a second sweeper finds
-- the hold gone).
-- KEYS: 1 meta, 2 claims, 3 holds, 4 users, 5 ledger
-- ARGV: 1 now, 2 drop id, 3 batch size
local meta, claims, holds, users, ledger = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now_s, drop = ARGV[1], ARGV[2]

local m = levels(meta)
if not m[1] then
  return refuse('not_found', 'drop')
end
local due = redis.call('ZRANGEBYSCORE', holds, '-inf', now_s, 'LIMIT', 0, tonumber(ARGV[3]))

-- Read and check everything first.
local remaining, reserved = tonumber(m[2]), tonumber(m[3])
local expired, stale, held = {}, {}, {}
for _, member in ipairs(due) do
  local n = tonumber(member)
  local cid = n and (drop .. '.' .. fmt(n))
  local enc = cid and redis.call('HGET', claims, cid)
  local c = enc and decode_claim(enc)
  if c and c.status == 'reserved' then
    local qty = tonumber(c.qty)
    remaining = remaining + qty
    reserved = reserved - qty
    if held[c.user] == nil then
      held[c.user] = tonumber(redis.call('HGET', users, c.user) or '0')
    end
    held[c.user] = held[c.user] - qty
    expired[#expired + 1] = {member = member, cid = cid, c = c}
  else
    -- A hold whose claim is no longer reserved cannot be expired; drop the stray entry.
    stale[#stale + 1] = member
  end
end

-- Then write.
local out = {'ok', m[1], fmt(remaining), fmt(reserved), m[4]}
if #expired > 0 then
  redis.call('HSET', meta, 'remaining', fmt(remaining), 'reserved', fmt(reserved))
end
for u, h in pairs(held) do
  set_held(users, u, h)
end
for _, member in ipairs(stale) do
  redis.call('ZREM', holds, member)
end
for _, e in ipairs(expired) do
  local c = e.c
  local enc = encode_claim('expired', c.qty, c.created, c.expires, c.user)
  redis.call('ZREM', holds, e.member)
  redis.call('HSET', claims, e.cid, enc)
  redis.call('XADD', ledger, '*', 'op', 'expire', 'claim_id', e.cid, 'user', c.user, 'qty', c.qty, 'ts', now_s)
  out[#out + 1] = e.cid
  out[#out + 1] = enc
end
return out
