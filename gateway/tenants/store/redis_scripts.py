"""The Lua scripts of `RedisLimitStore` (gateway/tenants/store/redis_store.py): one script per change of a key's state.

Each script runs atomically on the server, so replicas sharing one Redis see one limit. Time is Redis's TIME in
integer microseconds: exact in Lua's doubles (< 2**53) and shared by every replica whatever its own clock.
Comparisons match `MemoryLimitStore`: an entry at t has left the window when t <= now - window; a lease has ended
when its deadline <= now; usage minute m is kept while m >= current minute - retention.

Layout per API key, under `<prefix>{<name>}:` (one hash tag, so one Cluster slot per script):
  rw  ZSET  request entries (member: a sequence number), scored by time
  tw  ZSET  token entries ("p<seq>" prompt, "o<seq>" output), scored by time
  tc  HASH  token entry id -> cost; "sum": the running sum of the window's costs; "seq": the sequence counter
  l   ZSET  request_id -> lease deadline
  pr  HASH  request_id -> "<seq> <time> <cost>" of its prompt entry, for reconcile_prompt
  px  ZSET  request_id -> when its pr record may go (max(window, lease) after admission)
  d   HASH  UTC day -> tokens charged that day (today and yesterday kept)
  u   HASH  "<minute><r|p|o|x>" -> usage counts (requests, prompt, output, refused)
  um  ZSET  the minutes present in u
Expired entries are dropped one by one only over what expired, adjusting the running sum rather than recomputing
it; every key gets an expiry (never shortened), so an idle API key leaves nothing behind.
"""

from __future__ import annotations

SUFFIXES = ("rw", "tw", "tc", "l", "pr", "px", "d", "u", "um")

# KEYS: the nine keys above, in SUFFIXES order. ARGV[1]: window (µs), ARGV[2]: usage retention (minutes).
PRELUDE = """
local rw, tw, tc, ls, pr, px, dk, uk, um = unpack(KEYS, 1, 9)
local W, RET = tonumber(ARGV[1]), tonumber(ARGV[2])
local clock = redis.call('TIME')
local NOW = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local MIN, DAY = math.floor(NOW / 60000000), math.floor(NOW / 86400000000)
local function each(list, fn)  -- unpack() is bounded by Lua's stack
  for i = 1, #list, 500 do fn(unpack(list, i, math.min(i + 499, #list))) end
end
local function extend(key, ms)  -- never shortens: the key may hold entries that live longer
  ms = math.ceil(ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
local function prune()
  local horizon = NOW - W
  redis.call('ZREMRANGEBYSCORE', rw, '-inf', horizon)
  local gone = redis.call('ZRANGEBYSCORE', tw, '-inf', horizon)
  if #gone > 0 then
    local freed = 0
    each(gone, function(...)
      for _, c in ipairs(redis.call('HMGET', tc, ...)) do freed = freed + (tonumber(c) or 0) end
      redis.call('HDEL', tc, ...)
    end)
    redis.call('HINCRBY', tc, 'sum', -freed)
    redis.call('ZREMRANGEBYSCORE', tw, '-inf', horizon)
    extend(tc, W / 1000 + 1000)  -- in case tc expired before tw: HINCRBY must not leave a key without expiry
  end
  redis.call('ZREMRANGEBYSCORE', ls, '-inf', NOW)
  local old = redis.call('ZRANGEBYSCORE', px, '-inf', NOW)
  if #old > 0 then
    each(old, function(...) redis.call('HDEL', pr, ...) end)
    redis.call('ZREMRANGEBYSCORE', px, '-inf', NOW)
  end
end
local function add_usage(minute, col, n)
  if n == 0 or minute < MIN - RET then return end
  redis.call('HINCRBY', uk, minute .. col, n)
  if redis.call('ZADD', um, 'NX', minute, minute) == 1 then
    local old = redis.call('ZRANGEBYSCORE', um, '-inf', '(' .. (MIN - RET))
    each(old, function(...)
      local fields = {}
      for _, m in ipairs({...}) do
        for _, c in ipairs({'r', 'p', 'o', 'x'}) do fields[#fields + 1] = m .. c end
      end
      redis.call('HDEL', uk, unpack(fields))
    end)
    redis.call('ZREMRANGEBYSCORE', um, '-inf', '(' .. (MIN - RET))
    extend(uk, (RET + 2) * 60000)
    extend(um, (RET + 2) * 60000)
  end
end
local function add_day(day, n)
  if day < DAY - 1 then return end
  redis.call('HINCRBY', dk, day, n)
  redis.call('HDEL', dk, DAY - 2)
  extend(dk, ((DAY + 2) * 86400000000 - NOW) / 1000)
end
local function add_tokens(id, n)
  redis.call('ZADD', tw, NOW, id)
  redis.call('HSET', tc, id, n)
  redis.call('HINCRBY', tc, 'sum', n)
  extend(tw, W / 1000 + 1000)
  extend(tc, W / 1000 + 1000)
  add_day(DAY, n)
end
"""

# ARGV[3..9]: request_id, prompt, lease (µs), rpm, tpm, max_concurrent, daily (-1: unlimited).
# Returns {reason ('' admitted), retry (µs, -1: never), requests in window, tokens in window, reset µs x2}.
ADMIT = PRELUDE + """
prune()
local rid, prompt, lease = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local rpm, tpm, maxc, daily = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local nreq = redis.call('ZCARD', rw)
local used = tonumber(redis.call('HGET', tc, 'sum')) or 0
local reason, retry = '', 0
local function tokens_retry(excess)  -- oldest first, until enough has left the window
  local freed, i = 0, 0
  while true do
    local batch = redis.call('ZRANGE', tw, i, i + 99, 'WITHSCORES')
    if #batch == 0 then return W end
    local ids = {}
    for j = 1, #batch, 2 do ids[#ids + 1] = batch[j] end
    local costs = redis.call('HMGET', tc, unpack(ids))
    for j = 1, #ids do
      freed = freed + (tonumber(costs[j]) or 0)
      if freed >= excess then return tonumber(batch[2 * j]) + W - NOW end
    end
    i = i + 100
  end
end
if maxc >= 0 and redis.call('ZCARD', ls) >= maxc then
  reason = 'concurrency'  -- the caller answers CONCURRENCY_RETRY_S: when streams end is unknown here
elseif rpm >= 0 and nreq >= rpm then
  reason, retry = 'requests', -1
  if rpm > 0 then retry = tonumber(redis.call('ZRANGE', rw, nreq - rpm, nreq - rpm, 'WITHSCORES')[2]) + W - NOW end
elseif tpm >= 0 and used + prompt > tpm then
  reason, retry = 'tokens', -1
  if prompt <= tpm then retry = tokens_retry(used + prompt - tpm) end
elseif daily >= 0 and (tonumber(redis.call('HGET', dk, DAY)) or 0) + prompt > daily then
  reason, retry = 'daily_tokens', (DAY + 1) * 86400000000 - NOW
end
if reason == '' then
  local seq = redis.call('HINCRBY', tc, 'seq', 1)
  redis.call('ZADD', rw, NOW, seq)
  extend(rw, W / 1000 + 1000)
  add_tokens('p' .. seq, prompt)
  local keep = math.max(W, lease)
  redis.call('HSET', pr, rid, string.format('%d %d %d', seq, NOW, prompt))
  redis.call('ZADD', px, NOW + keep, rid)
  extend(pr, keep / 1000 + 1000)
  extend(px, keep / 1000 + 1000)
  if maxc >= 0 then
    redis.call('ZADD', ls, NOW + lease, rid)
    extend(ls, lease / 1000 + 1000)
  end
  add_usage(MIN, 'r', 1)
  add_usage(MIN, 'p', prompt)
end
nreq = redis.call('ZCARD', rw)
used = tonumber(redis.call('HGET', tc, 'sum')) or 0
local rreset, treset = 0, 0
if nreq > 0 then rreset = tonumber(redis.call('ZRANGE', rw, -1, -1, 'WITHSCORES')[2]) + W - NOW end
if used > 0 then treset = tonumber(redis.call('ZRANGE', tw, -1, -1, 'WITHSCORES')[2]) + W - NOW end
return {reason, retry, nreq, used, rreset, treset}
"""

# Output tokens already produced: counted whatever the window holds.
CHARGE_FN = """
local function charge(n)
  if n <= 0 then return end
  add_tokens('o' .. redis.call('HINCRBY', tc, 'seq', 1), n)
  add_usage(MIN, 'o', n)
end
"""

# The prompt entry recorded at admission set to the worker's exact count, keeping its time.
RECONCILE_FN = """
local function reconcile(request_id, n)
  local rec = redis.call('HGET', pr, request_id)
  if not rec then return 0 end
  local seq, at, old = string.match(rec, '(%d+) (%d+) (%d+)')
  at, old = tonumber(at), tonumber(old)
  local diff = n - old
  if diff == 0 then return 0 end
  local id = 'p' .. seq
  local score = redis.call('ZSCORE', tw, id)
  if score and tonumber(score) == at then  -- still in the window (and not a reused sequence number)
    redis.call('HSET', tc, id, n)
    redis.call('HINCRBY', tc, 'sum', diff)
  end
  redis.call('HSET', pr, request_id, string.format('%d %d %d', seq, at, n))
  add_day(math.floor(at / 86400000000), diff)
  add_usage(math.floor(at / 60000000), 'p', diff)
  return 1
end
"""

CHARGE = PRELUDE + CHARGE_FN + """
prune()
charge(tonumber(ARGV[3]))
"""

RECONCILE = PRELUDE + RECONCILE_FN + """
prune()
return reconcile(ARGV[3], tonumber(ARGV[4]))
"""

# A request's end in one round trip: its lease given back, its prompt reconciled (ARGV[4] >= 0), its remaining
# output charged (ARGV[5]).
FINISH = PRELUDE + CHARGE_FN + RECONCILE_FN + """
prune()
redis.call('ZREM', ls, ARGV[3])
local prompt = tonumber(ARGV[4])
if prompt >= 0 then reconcile(ARGV[3], prompt) end
charge(tonumber(ARGV[5]))
return 1
"""

REFUSED = PRELUDE + "add_usage(MIN, 'x', 1)\n"

# KEYS: u, um. ARGV: first and last minute. Returns {buckets found, requests, prompt, output, refused}.
USAGE = """
local RET = tonumber(ARGV[3])
local clock = redis.call('TIME')
local lo = math.max(tonumber(ARGV[1]), math.floor(tonumber(clock[1]) / 60) - RET)
local minutes = redis.call('ZRANGEBYSCORE', KEYS[2], lo, ARGV[2])
local sums, cols = {0, 0, 0, 0}, {'r', 'p', 'o', 'x'}
for i = 1, #minutes, 500 do
  local fields = {}
  for j = i, math.min(i + 499, #minutes) do
    for _, c in ipairs(cols) do fields[#fields + 1] = minutes[j] .. c end
  end
  local values = redis.call('HMGET', KEYS[1], unpack(fields))
  for k = 1, #values do sums[(k - 1) % 4 + 1] = sums[(k - 1) % 4 + 1] + (tonumber(values[k]) or 0) end
end
return {#minutes, sums[1], sums[2], sums[3], sums[4]}
"""

# KEYS: the registry of names. ARGV: name, how long a silent name stays listed (s).
TOUCH = """
local now = tonumber(redis.call('TIME')[1])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('EXPIRE', KEYS[1], ARGV[2])
"""
