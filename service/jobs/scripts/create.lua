-- Store a new queued job, unless its idempotency key was used before, an active job
-- already writes to its output, or its tenant has too many queued jobs.
-- Returns {outcome, ref}: created <id> | replay <earlier id> | idem_conflict <earlier id>
-- | output_busy <holder id> <the held location> | quota <queued count>.
-- The output is busy when an active job holds it, a location containing it (one HGET per
-- parent: the depth) or one inside it (all outputs inside it sort right after it: one
-- ZRANGEBYLEX; '\255' sorts after every byte of UTF-8 text).
-- The quota count reads the job hashes of the tenant's queued set by name (not KEYS):
-- fine on a single Redis, which is what the service runs on.
--
-- KEYS
--   job                the new job's hash
--   events             its event list
--   all_jobs           the index of every job
--   index_queued       the index of queued jobs
--   outputs            output -> id of the active job writing it
--   idempotency        the idempotency record (unused without a key)
--   tenant_jobs        the tenant's jobs
--   tenant_queued      the tenant's jobs that were queued when last looked at
--   outputs_sorted     the reserved outputs as a sorted set
-- ARGV
--   job_id             the new job's id
--   fields             JSON object of the job's hash fields
--   output             the output it reserves (drmerge.locations.as_prefix form)
--   use_idempotency    1 with an idempotency key, else 0
--   body_hash          sha256 of the request body (service.jobs.store.body_hash)
--   idempotency_ttl_s  how long the idempotency record lives
--   event              JSON of the "job created" event
--   max_queued         most queued jobs of the tenant (0: no limit)
--   job_key_prefix     the job hash key without the id (to read the tenant's jobs)
--   parents            JSON list of the output's parents (drmerge.locations.parents)
if A.use_idempotency == '1' then
  local prev = redis.call('GET', K.idempotency)
  if prev then
    local p = cjson.decode(prev)
    if p['body_sha256'] == A.body_hash then return {'replay', p['job_id']} end
    return {'idem_conflict', p['job_id']}
  end
end
local holder = redis.call('HGET', K.outputs, A.output)
if holder then return {'output_busy', holder, A.output} end
for _, parent in ipairs(cjson.decode(A.parents)) do
  holder = redis.call('HGET', K.outputs, parent)
  if holder then return {'output_busy', holder, parent} end
end
while true do
  local inside = redis.call('ZRANGEBYLEX', K.outputs_sorted, '(' .. A.output, '(' .. A.output .. '\255', 'LIMIT', 0, 1)
  if #inside == 0 then break end
  holder = redis.call('HGET', K.outputs, inside[1])
  if holder then return {'output_busy', holder, inside[1]} end
  redis.call('ZREM', K.outputs_sorted, inside[1])  -- no holder: a stale entry, never written by these scripts
end
local maxq = tonumber(A.max_queued)
if maxq > 0 then
  local n = 0
  for _, qid in ipairs(redis.call('ZRANGE', K.tenant_queued, 0, -1)) do
    if redis.call('HGET', A.job_key_prefix .. qid, 'status') == 'queued' then n = n + 1
    else redis.call('ZREM', K.tenant_queued, qid) end
  end
  if n >= maxq then return {'quota', tostring(n)} end
  redis.call('ZADD', K.tenant_queued, 0, A.job_id)
end
redis.call('ZADD', K.tenant_jobs, 0, A.job_id)
local fields = cjson.decode(A.fields)
for k, v in pairs(fields) do redis.call('HSET', K.job, k, v) end
redis.call('HSET', K.job, 'event_seq', 1)
redis.call('ZADD', K.all_jobs, 0, A.job_id)
redis.call('ZADD', K.index_queued, 0, A.job_id)
redis.call('HSET', K.outputs, A.output, A.job_id)
redis.call('ZADD', K.outputs_sorted, 0, A.output)
if A.use_idempotency == '1' then
  redis.call('SET', K.idempotency, cjson.encode({job_id=A.job_id, body_sha256=A.body_hash}), 'EX',
             tonumber(A.idempotency_ttl_s))
end
redis.call('RPUSH', K.events, A.event)
return {'created', A.job_id}
