-- KEYS[1]: key; ARGV[1]: the value expected now, ARGV[2]: the new value, ARGV[3]: ttl ms.
-- Replace the value only if it is still the one read (a compare-and-set); 1 if replaced, else 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
