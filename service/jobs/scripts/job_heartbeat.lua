-- The owning attempt's heartbeat, stamped with Redis's clock (the reaper judges
-- staleness by the same clock, so host clock skew does not matter). Returns 0 when the
-- attempt no longer owns the job (re-queued, claimed by another worker, or ended): the
-- worker then stops without touching the output, which now belongs to someone else.
--
-- KEYS
--   job                the job hash
-- ARGV
--   attempt            the attempt stamping it
if not OWNED[redis.call('HGET', K.job, 'status')] then return 0 end
if redis.call('HGET', K.job, 'attempts') ~= A.attempt then return 0 end
local t = redis.call('TIME')
redis.call('HSET', K.job, 'heartbeat_at', string.format('%d.%06d', t[1], t[2]))
return 1
