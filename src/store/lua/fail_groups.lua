-- Fails at most ARGV[3] open groups whose deadline passed `now`, nearest deadline first:
-- every member's unit goes back to stock and one `group_fail` is logged per group. Only
-- groups still `open` are failed, so concurrent sweepers fail each group exactly once.
-- KEYS: 1 meta, 2 users, 3 groups, 4 gmembers, 5 gdue, 6 ledger
-- ARGV: 1 now, 2 drop id, 3 batch size
local meta, users, groups, gmembers, gdue, ledger = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local now_s, drop = ARGV[1], ARGV[2]

local m = levels(meta)
if not m[1] then
  return refuse('not_found', 'drop')
end
local due = redis.call('ZRANGEBYSCORE', gdue, '-inf', now_s, 'LIMIT', 0, tonumber(ARGV[3]))

-- Read and check everything first.
local remaining, reserved = tonumber(m[2]), tonumber(m[3])
local failed, held = {}, {}
for _, member in ipairs(due) do
  local n = tonumber(member)
  local g = n and read_group(groups, drop .. '.g' .. fmt(n))
  if g and g.status == 'open' then
    local members = group_members(gmembers, g)
    for _, u in ipairs(members) do
      if held[u] == nil then
        held[u] = tonumber(redis.call('HGET', users, u) or '0')
      end
      held[u] = held[u] - 1
    end
    remaining = remaining + g.count
    reserved = reserved - g.count
    failed[#failed + 1] = {g = g, members = members}
  end
end

-- Then write.
local out = {'ok', m[1], fmt(remaining), fmt(reserved), m[4]}
if #failed > 0 then
  redis.call('HSET', meta, 'remaining', fmt(remaining), 'reserved', fmt(reserved))
end
for u, h in pairs(held) do
  set_held(users, u, h)
end
for _, member in ipairs(due) do
  redis.call('ZREM', gdue, member)
end
for _, f in ipairs(failed) do
  f.g.status = 'failed'
  write_group(groups, f.g)
  log_group(ledger, 'group_fail', f.g.gid, nil, fmt(f.g.count), now_s)
  group_reply(out, gmembers, f.g, f.members)
end
return out
