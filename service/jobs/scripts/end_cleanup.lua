-- A cleanup ended: ``outcome`` done (nothing of the job is left) or failed (given up).
-- The output reservation the job kept for it is released once the job is over.
-- Returns 1, or 0 when the job does not exist.
--
-- KEYS
--   job                the job hash
--   events             its event list
--   cleanup_due        job id -> when its next output cleanup attempt is due
--   outputs            output -> id of the active job writing it
--   outputs_sorted     the same outputs as a sorted set
-- ARGV
--   job_id             the job's id
--   outcome            done | failed
--   event              JSON of the cleanup event
--   max_events         the event list keeps this many, newest
redis.call('ZREM', K.cleanup_due, A.job_id)
if redis.call('EXISTS', K.job) == 0 then return 0 end
if A.outcome == 'done' then
  redis.call('HDEL', K.job, 'cleanup', 'cleanup_files', 'cleanup_attempts')
else
  redis.call('HSET', K.job, 'cleanup', A.outcome)
end
local st = redis.call('HGET', K.job, 'status')
local out = redis.call('HGET', K.job, 'output')
if st and TERMINAL[st] and out and redis.call('HGET', K.outputs, out) == A.job_id then
  redis.call('HDEL', K.outputs, out)
  redis.call('ZREM', K.outputs_sorted, out)
end
local ev = cjson.decode(A.event)
ev['id'] = redis.call('HINCRBY', K.job, 'event_seq', 1)
redis.call('RPUSH', K.events, cjson.encode(ev))
redis.call('LTRIM', K.events, -tonumber(A.max_events), -1)
return 1
