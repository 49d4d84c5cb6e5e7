-- Appends a chat message: the room's next seq, stored as the stream entry id `seq-0` in a
-- stream capped at exactly ARGV[6] entries (MAXLEN =, so `chat_since` knows what it lost).
-- KEYS: 1 room meta, 2 chat stream
-- ARGV: 1 message id, 2 user id, 3 user name, 4 text, 5 ts, 6 history
local meta, chat = KEYS[1], KEYS[2]
if redis.call('HEXISTS', meta, 'room') == 0 then
  return refuse('not_found', 'room')
end
local seq = redis.call('HINCRBY', meta, 'seq', 1)
redis.call('XADD', chat, 'MAXLEN', '=', ARGV[6], fmt(seq) .. '-0',
  'id', ARGV[1], 'uid', ARGV[2], 'uname', ARGV[3], 'text', ARGV[4], 'ts', ARGV[5])
return {'ok', fmt(seq)}
