-- Append one event to an existing job's log (numbered by the job's event_seq).
-- Returns 1, or 0 when the job does not exist.
--
-- KEYS
--   job                the job hash
--   events             its event list
-- ARGV
--   event              JSON of the event (its id is added here)
--   max_events         the event list keeps this many, newest
if redis.call('EXISTS', K.job) == 0 then return 0 end
local ev = cjson.decode(A.event)
ev['id'] = redis.call('HINCRBY', K.job, 'event_seq', 1)
redis.call('RPUSH', K.events, cjson.encode(ev))
redis.call('LTRIM', K.events, -tonumber(A.max_events), -1)
return 1
