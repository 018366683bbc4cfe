-- Write a job's progress (and maybe one event), only from the attempt that owns the
-- job and only while it is owned (running or cancelling): a late write from a
-- fenced-off worker changes nothing. Returns 1 if written, else 0.
--
-- KEYS
--   job                the job hash
--   stats              the byte counters
--   events             its event list
-- ARGV
--   attempt            the writing attempt
--   progress           JSON of the progress
--   now                unix time
--   d_read             bytes read since the last write (added to the counters)
--   d_written          bytes written since the last write
--   event              JSON of an event to append, or ''
--   max_events         the event list keeps this many, newest
if not OWNED[redis.call('HGET', K.job, 'status')] then return 0 end
if redis.call('HGET', K.job, 'attempts') ~= A.attempt then return 0 end
redis.call('HSET', K.job, 'progress', A.progress, 'updated_at', A.now)
if tonumber(A.d_read) > 0 then redis.call('HINCRBY', K.stats, 'bytes_read', A.d_read) end
if tonumber(A.d_written) > 0 then redis.call('HINCRBY', K.stats, 'bytes_written', A.d_written) end
if A.event ~= '' then
  local ev = cjson.decode(A.event)
  ev['id'] = redis.call('HINCRBY', K.job, 'event_seq', 1)
  redis.call('RPUSH', K.events, cjson.encode(ev))
  redis.call('LTRIM', K.events, -tonumber(A.max_events), -1)
end
return 1
