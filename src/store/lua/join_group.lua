-- Joins a group: idempotency replay, then group_full (completed), group_closed (failed or
-- past its deadline), already_member, ended, limit_reached, sold_out, in the memory
-- engine's order; on success reserves one unit and logs `group_join`. The join that fills
-- the last place completes the group in this same script: every member's unit becomes
-- sold and `group_complete` is logged, so no other join can slip in.
-- KEYS: 1 meta, 2 users, 3 groups, 4 gmembers, 5 gdue, 6 idempotency record, 7 ledger
-- ARGV: 1 group id, 2 user id, 3 now, 4 idempotency expires_at, 5 record ttl in ms,
--       6 '1' when a key was given, 7 gdue member of the group
local meta, users, groups, gmembers, gdue, idem, ledger =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local gid, user, now_s = ARGV[1], ARGV[2], ARGV[3]
local now = tonumber(now_s)

local m = redis.call('HMGET', meta, 'total', 'remaining', 'reserved', 'sold', 'ended',
  'ends_at', 'limit')
local g = m[1] and read_group(groups, gid)
if not g then
  return refuse('not_found', 'group')
end
local replayed = group_replay(idem, ARGV[6], now)
if replayed then
  return replay_reply(m, groups, gmembers, replayed)
end
if g.status == 'completed' then
  return refuse('group_full', '')
end
if g.status ~= 'open' or now >= tonumber(g.expires) then
  return refuse('group_closed', '')
end
if is_member(gmembers, gid, user) then
  return refuse('already_member', '')
end
local refused = window_refusal(m[5], nil, m[6], now)
if refused then
  return refused
end
local held = tonumber(redis.call('HGET', users, user) or '0')
local remaining = tonumber(m[2])
refused = units_refusal(held, 1, m[7], remaining)
if refused then
  return refused
end

-- Every precondition holds: write.
remaining = remaining - 1
local reserved = tonumber(m[3]) + 1
local sold = tonumber(m[4])
redis.call('HSET', users, user, fmt(held + 1))
add_member(gmembers, g, user)
log_group(ledger, 'group_join', gid, user, '1', now_s)
if g.count >= g.size then
  g.status = 'completed'
  reserved = reserved - g.size
  sold = sold + g.size
  redis.call('ZREM', gdue, ARGV[7])
  log_group(ledger, 'group_complete', gid, nil, fmt(g.size), now_s)
end
redis.call('HSET', meta, 'remaining', fmt(remaining), 'reserved', fmt(reserved), 'sold', fmt(sold))
write_group(groups, g)
remember_group(idem, ARGV[6], ARGV[4], ARGV[5], gid)
local out = {'ok', '0', m[1], fmt(remaining), fmt(reserved), fmt(sold)}
group_reply(out, gmembers, g)
return out
