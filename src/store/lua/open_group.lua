-- Opens a group with the caller as leader: idempotency replay, then not_group, ended,
-- not_started, limit_reached, sold_out, in the memory engine's order; on success reserves
-- the leader's unit, writes the group, its deadline, the idempotency record and the
-- `group_open` ledger entry.
-- KEYS: 1 meta, 2 users, 3 groups, 4 gmembers, 5 gdue, 6 idempotency record, 7 ledger
-- ARGV: 1 drop id, 2 user id, 3 now, 4 idempotency expires_at, 5 record ttl in ms,
--       6 '1' when a key was given
local meta, users, groups, gmembers, gdue, idem, ledger =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local drop, user, now_s = ARGV[1], ARGV[2], ARGV[3]
local now = tonumber(now_s)

local m = redis.call('HMGET', meta, 'total', 'remaining', 'reserved', 'sold', 'ended',
  'starts_at', 'ends_at', 'limit', 'next_group', 'gsize', 'gprice', 'gwindow_ms')
if not m[1] then
  return refuse('not_found', 'drop')
end
local gid = group_replay(idem, ARGV[6], now)
if gid then
  return replay_reply(m, groups, gmembers, gid)
end
if not m[10] or m[10] == '' then
  return refuse('not_group', '')
end
local refused = window_refusal(m[5], m[6], m[7], now)
if refused then
  return refused
end
local held = tonumber(redis.call('HGET', users, user) or '0')
local remaining = tonumber(m[2])
refused = units_refusal(held, 1, m[8], remaining)
if refused then
  return refused
end

-- Every precondition holds: write.
local n = tonumber(m[9] or '0') + 1
gid = drop .. '.g' .. fmt(n)
local expires = now + tonumber(m[12])
if m[7] ~= '' and tonumber(m[7]) < expires then
  expires = tonumber(m[7])
end
local g = {gid = gid, status = 'open', size = tonumber(m[10]), price = m[11],
  created = now_s, expires = fmt(expires), count = 0}
remaining = remaining - 1
local reserved = tonumber(m[3]) + 1
redis.call('HSET', meta, 'remaining', fmt(remaining), 'reserved', fmt(reserved), 'next_group', fmt(n))
redis.call('HSET', users, user, fmt(held + 1))
add_member(gmembers, g, user)
write_group(groups, g)
redis.call('ZADD', gdue, g.expires, hold_member(n))
remember_group(idem, ARGV[6], ARGV[4], ARGV[5], gid)
log_group(ledger, 'group_open', gid, user, '1', now_s)
local out = {'ok', '0', m[1], fmt(remaining), fmt(reserved), m[4]}
group_reply(out, gmembers, g, {user})
return out
