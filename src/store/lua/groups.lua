-- Group helpers, prepended (after common.lua) to the group scripts by src/store/redis.rs.
-- A group lives in two hashes of its drop: `groups` holds GID ->
-- "status|size|price|created|expires|count", and `gmembers` holds "GID:N" -> the N-th
-- member and "GID|USER" -> N (membership). Open groups sit in the `gdue` zset, scored by
-- deadline, member = the zero-padded group number (as claim holds).

local function read_group(groups, gid)
  local rec = redis.call('HGET', groups, gid)
  if not rec then
    return nil
  end
  local status, size, price, created, expires, count =
    string.match(rec, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
  if not status or not tonumber(size) or not tonumber(expires) or not tonumber(count) then
    return nil
  end
  return {gid = gid, status = status, size = tonumber(size), price = price,
    created = created, expires = expires, count = tonumber(count)}
end

local function write_group(groups, g)
  redis.call('HSET', groups, g.gid, g.status .. '|' .. fmt(g.size) .. '|' .. g.price .. '|' ..
    g.created .. '|' .. g.expires .. '|' .. fmt(g.count))
end

local function add_member(gmembers, g, user)
  g.count = g.count + 1
  redis.call('HSET', gmembers, g.gid .. ':' .. fmt(g.count), user, g.gid .. '|' .. user, fmt(g.count))
end

local function is_member(gmembers, gid, user)
  return redis.call('HEXISTS', gmembers, gid .. '|' .. user) == 1
end

local function group_members(gmembers, g)
  if g.count == 0 then
    return {}
  end
  local fields = {}
  for i = 1, g.count do
    fields[i] = g.gid .. ':' .. fmt(i)
  end
  return redis.call('HMGET', gmembers, unpack(fields))
end

-- Appends a group to a reply: gid, status, size, price, created, expires, count, members...
local function group_reply(out, gmembers, g, members)
  for _, v in ipairs({g.gid, g.status, fmt(g.size), g.price, g.created, g.expires, fmt(g.count)}) do
    out[#out + 1] = v
  end
  for _, u in ipairs(members or group_members(gmembers, g)) do
    out[#out + 1] = u
  end
end

-- The group id of a live idempotency record ("expires_at|gid"); a dead one is forgotten.
local function group_replay(idem, use_key, now)
  if use_key ~= '1' then
    return nil
  end
  local rec = redis.call('GET', idem)
  if not rec then
    return nil
  end
  local exp, gid = string.match(rec, '^([^|]*)|(.*)$')
  if exp and tonumber(exp) and tonumber(exp) > now then
    return gid
  end
  redis.call('DEL', idem)
  return nil
end

-- Answers a replay: the group and the drop's counters as they are now.
local function replay_reply(m, groups, gmembers, gid)
  local g = read_group(groups, gid)
  if not g then
    return refuse('internal', 'idempotency record without group')
  end
  local out = {'ok', '1', m[1], m[2], m[3], m[4]}
  group_reply(out, gmembers, g)
  return out
end

local function remember_group(idem, use_key, expires_at, ttl_ms, gid)
  if use_key == '1' then
    redis.call('SET', idem, expires_at .. '|' .. gid, 'PX', ttl_ms)
  end
end

local function log_group(ledger, op, gid, user, qty, now_s)
  if user then
    redis.call('XADD', ledger, '*', 'op', op, 'group', gid, 'user', user, 'qty', qty, 'ts', now_s)
  else
    redis.call('XADD', ledger, '*', 'op', op, 'group', gid, 'qty', qty, 'ts', now_s)
  end
end
