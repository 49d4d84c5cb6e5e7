-- Reads groups of one drop: the named ones (ARGV), or with no ARGV every open one (gdue).
-- Read-only; answers `not_found` for a missing drop only when listing.
-- KEYS: 1 meta, 2 groups, 3 gmembers, 4 gdue
-- ARGV: group ids (none = every open group); drop id first when listing
local meta, groups, gmembers, gdue = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ids = ARGV
if #ARGV == 1 and string.sub(ARGV[1], 1, 1) == '*' then
  if redis.call('EXISTS', meta) == 0 then
    return refuse('not_found', 'drop')
  end
  local drop = string.sub(ARGV[1], 2)
  ids = {}
  for _, member in ipairs(redis.call('ZRANGE', gdue, 0, -1)) do
    ids[#ids + 1] = drop .. '.g' .. fmt(tonumber(member))
  end
end
local out = {'ok'}
for _, gid in ipairs(ids) do
  local g = read_group(groups, gid)
  if g then
    group_reply(out, gmembers, g)
  end
end
return out
