-- KEYS[1]: in-flight zset of one principal (member: request id, score: lease expiry in ms of Redis' clock)
-- ARGV[1]: request id, ARGV[2]: lease ms, ARGV[3]: limit. Returns 1 when the slot is taken, 0 at the limit.
-- Expired leases (a replica that died mid-request) are dropped first, so a crash never leaks a slot for long.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
