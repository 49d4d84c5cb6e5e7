-- Appends a value to a cross-slot index list once: idempotent, so a retried or repeated
-- index write can never list an id twice (a room's drops, a user's claims).
-- KEYS: 1 list
-- ARGV: 1 value
if not redis.call('LPOS', KEYS[1], ARGV[1]) then
  redis.call('RPUSH', KEYS[1], ARGV[1])
end
return {'ok'}
