-- Adds likes to an existing room and returns the new total.
-- KEYS: 1 room meta
-- ARGV: 1 n
if redis.call('HEXISTS', KEYS[1], 'room') == 0 then
  return refuse('not_found', 'room')
end
return {'ok', fmt(redis.call('HINCRBY', KEYS[1], 'likes', ARGV[1]))}
