-- Append (or replace, by name) one committed output shard in the job's resume journal;
-- fenced like progress. Returns 1 if recorded, else 0.
--
-- KEYS
--   job                the job hash
-- ARGV
--   attempt            the attempt that committed the shard
--   entry              JSON {name, size, sha256, plan}
if not OWNED[redis.call('HGET', K.job, 'status')] then return 0 end
if redis.call('HGET', K.job, 'attempts') ~= A.attempt then return 0 end
local entry = cjson.decode(A.entry)
local raw = redis.call('HGET', K.job, 'shards')
local list = {}
if raw and raw ~= '' then list = cjson.decode(raw) end
local out = {}
for _, e in ipairs(list) do if e['name'] ~= entry['name'] then table.insert(out, e) end end
table.insert(out, entry)
redis.call('HSET', K.job, 'shards', cjson.encode(out))
return 1
