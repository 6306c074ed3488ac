-- The composition at one epoch, read atomically.
-- KEYS: epoch, active, router, routing; ARGV[1]: compartment key prefix.
-- Returns {epoch, router, routing ('' when unset), id1, h1, id2, h2...}.
-- Reads undeclared keys (the compartment hashes): fine on a single Redis; on a cluster use a hash-tag
-- namespace such as "{cdm}" so every key lives in one slot.
local ids = redis.call('SMEMBERS', KEYS[2])
table.sort(ids)
local out = {redis.call('GET', KEYS[1]) or '0', redis.call('HGETALL', KEYS[3]), redis.call('GET', KEYS[4]) or ''}
for _, id in ipairs(ids) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGETALL', ARGV[1] .. id)
end
return out
