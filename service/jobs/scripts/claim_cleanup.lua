-- The next try of a due cleanup: count it and schedule the one after (exponential
-- backoff), so a lost message is retried too. Returns {attempt, queue}, or false if it
-- is not due or no longer pending.
--
-- KEYS
--   job                the job hash
--   cleanup_due        job id -> when its next output cleanup attempt is due
-- ARGV
--   job_id             the job's id
--   now                unix time
--   backoff_base_s     delay after the first try; doubles with each try
--   backoff_max_s      cap on the delay
local due = redis.call('ZSCORE', K.cleanup_due, A.job_id)
if not due or tonumber(due) > tonumber(A.now) then return false end
if redis.call('HGET', K.job, 'cleanup') ~= 'pending' then
  redis.call('ZREM', K.cleanup_due, A.job_id)
  return false
end
local n = redis.call('HINCRBY', K.job, 'cleanup_attempts', 1)
local delay = math.min(tonumber(A.backoff_max_s), tonumber(A.backoff_base_s) * 2 ^ (n - 1))
redis.call('ZADD', K.cleanup_due, string.format('%.3f', tonumber(A.now) + delay), A.job_id)
return {n, redis.call('HGET', K.job, 'queue') or ''}
