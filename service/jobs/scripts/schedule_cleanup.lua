-- Mark a job's output for a later cleanup: cleanup = pending, ``files`` added to
-- cleanup_files, due at ``due`` unless a retry is already scheduled. Returns 1, or 0
-- when the job does not exist.
--
-- KEYS
--   job                the job hash
--   cleanup_due        job id -> when its next output cleanup attempt is due
-- ARGV
--   job_id             the job's id
--   files              JSON list of objects that may remain besides its shards
--   due                unix time of the first try
if redis.call('EXISTS', K.job) == 0 then return 0 end
local raw = redis.call('HGET', K.job, 'cleanup_files')
local list, have = {}, {}
if raw and raw ~= '' then for _, n in ipairs(cjson.decode(raw)) do table.insert(list, n) end end
for _, n in ipairs(list) do have[n] = true end
for _, n in ipairs(cjson.decode(A.files)) do
  if not have[n] then table.insert(list, n); have[n] = true end
end
redis.call('HSET', K.job, 'cleanup', 'pending', 'cleanup_files', #list > 0 and cjson.encode(list) or '[]')
redis.call('ZADD', K.cleanup_due, 'NX', A.due, A.job_id)
return 1
