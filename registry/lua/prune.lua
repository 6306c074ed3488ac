-- KEYS: daemons index, daemon key; ARGV[1]: daemon id. Drop the id from the index if its key has expired.
if redis.call('EXISTS', KEYS[2]) == 0 then return redis.call('ZREM', KEYS[1], ARGV[1]) end
return 0
