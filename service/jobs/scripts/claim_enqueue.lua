-- A queued job whose message is not known to be sent: mark it sent (the caller then
-- sends it), so that two processes never both re-send one job. Returns 1 to the one
-- caller that should send, else 0.
--
-- KEYS
--   job                the job hash
-- ARGV
--   now                unix time, recorded as enqueued_at
if redis.call('HGET', K.job, 'status') ~= 'queued' then return 0 end
local at = redis.call('HGET', K.job, 'enqueued_at')
if at and at ~= '' then return 0 end
redis.call('HSET', K.job, 'enqueued_at', A.now)
return 1
