-- Move one job to a new status, if its current status allows it, in one atomic step:
-- the status, the per-status indexes, the event log, the output reservation, the
-- webhook queue and the duration histogram change together or not at all.
-- Returns {outcome, status before}: outcome ok | missing | illegal | stale | alive.
--
-- KEYS
--   job                the job hash
--   events             its event list
--   outputs            output -> id of the active job writing it
--   webhooks_due       job id -> when its next webhook attempt is due
--   stats              byte counters and the duration histogram
--   index_queued       the per-status indexes (index_<status>), one per JobStatus
--   index_running
--   index_cancelling
--   index_succeeded
--   index_failed
--   index_cancelled
--   outputs_sorted     the same outputs as a sorted set (prefix lookups at create)
--   cleanup_due        job id -> when its next output cleanup attempt is due
-- ARGV
--   job_id             the job's id
--   to                 the new status
--   sources            space-separated statuses it may move from
--   now                unix time of the change
--   attempt            the attempt that must own the job ('' = any)
--   fields             JSON object of hash fields to set with it (already encoded)
--   duration_buckets   space-separated histogram bucket bounds, in seconds
--   event              JSON of the status event (id and from are added here)
--   max_events         the event list keeps this many, newest
--   stale_after        the reaper's condition ('' = none): act only if the owner's
--                      heartbeat is at least this many seconds old by Redis's clock
--   cleanup_due_at     when a pending cleanup (set in fields) is first due ('' = none)
local cur = redis.call('HGET', K.job, 'status')
if not cur then return {'missing', ''} end
local ok = false
for s in string.gmatch(A.sources, '%S+') do if s == cur then ok = true end end
if not ok then return {'illegal', cur} end
if A.attempt ~= '' and redis.call('HGET', K.job, 'attempts') ~= A.attempt then return {'stale', cur} end
if A.stale_after ~= '' then
  -- updated_at stands in until the first heartbeat
  local hb = tonumber(redis.call('HGET', K.job, 'heartbeat_at') or redis.call('HGET', K.job, 'updated_at') or '0')
  local t = redis.call('TIME')
  if tonumber(t[1]) + tonumber(t[2]) / 1e6 - hb < tonumber(A.stale_after) then return {'alive', cur} end
end
local fields = cjson.decode(A.fields)
for k, v in pairs(fields) do redis.call('HSET', K.job, k, v) end
redis.call('HSET', K.job, 'status', A.to, 'updated_at', A.now)
if cur ~= A.to then
  redis.call('ZREM', K['index_' .. cur], A.job_id)
  redis.call('ZADD', K['index_' .. A.to], 0, A.job_id)
end
if A.cleanup_due_at ~= '' then redis.call('ZADD', K.cleanup_due, A.cleanup_due_at, A.job_id) end
if TERMINAL[A.to] then
  -- the output stays reserved while partial output of this job may remain (cleanup pending)
  local out = redis.call('HGET', K.job, 'output')
  if out and redis.call('HGET', K.outputs, out) == A.job_id and redis.call('HGET', K.job, 'cleanup') ~= 'pending' then
    redis.call('HDEL', K.outputs, out)
    redis.call('ZREM', K.outputs_sorted, out)
  end
  if redis.call('HEXISTS', K.job, 'webhook') == 1 then
    redis.call('HSET', K.job, 'webhook_state', cjson.encode({status='pending', attempts=0}))
    redis.call('ZADD', K.webhooks_due, A.now, A.job_id)
  end
  local started = redis.call('HGET', K.job, 'started_at')
  if started and started ~= '' then
    local d = tonumber(A.now) - tonumber(started)
    if d < 0 then d = 0 end
    for le in string.gmatch(A.duration_buckets, '%S+') do
      if d <= tonumber(le) then redis.call('HINCRBY', K.stats, 'dur:' .. A.to .. ':' .. le, 1) end
    end
    redis.call('HINCRBY', K.stats, 'dur:' .. A.to .. ':count', 1)
    redis.call('HINCRBYFLOAT', K.stats, 'dur:' .. A.to .. ':sum', d)
  end
end
local ev = cjson.decode(A.event)
ev['id'] = redis.call('HINCRBY', K.job, 'event_seq', 1)
ev['from'] = cur
redis.call('RPUSH', K.events, cjson.encode(ev))
redis.call('LTRIM', K.events, -tonumber(A.max_events), -1)
return {'ok', cur}
