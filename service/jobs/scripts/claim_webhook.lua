-- Claim the earliest due webhook delivery: move its due time forward by a lease, so a
-- crashed deliverer's claim expires and another process retries it. Returns the job id,
-- or false when nothing is due.
--
-- KEYS
--   webhooks_due       job id -> when its next webhook attempt is due
-- ARGV
--   now                unix time
--   lease_s            seconds the claim holds
local due = redis.call('ZRANGEBYSCORE', K.webhooks_due, '-inf', A.now, 'LIMIT', 0, 1)
if #due == 0 then return false end
redis.call('ZADD', K.webhooks_due, tonumber(A.now) + tonumber(A.lease_s), due[1])
return due[1]
