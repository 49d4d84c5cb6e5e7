-- Adds a drop id to its room's list once (idempotent, so a retry after a failure is safe).
-- KEYS: 1 room drops list
-- ARGV: 1 drop id
if not redis.call('LPOS', KEYS[1], ARGV[1]) then
  redis.call('RPUSH', KEYS[1], ARGV[1])
end
return {'ok'}
