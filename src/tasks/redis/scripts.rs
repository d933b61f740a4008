//! The store's Lua scripts: each state change is one script, so it is atomic on the server,
//! and the record's field order they share with `get`.

/// Creates the task unless the idempotency key (KEYS[2], if ARGV[3] == '1') names one already,
/// or the tenant's open tasks (KEYS[3]) number ARGV[5] (> 0) already. Returns the id of the
/// task that holds the key afterwards, or '' when over the quota. With a time in ARGV[7], the
/// task joins the outbox (KEYS[4]) due then: its message is among its fields (`ob_*`). Safe to
/// send twice: a second run finds the task and answers its id.
pub(super) const CREATE: &str = r#"
-- Ids are fresh random: a task already there is this very call, sent again.
if redis.call('EXISTS', KEYS[1]) == 1 then return ARGV[1] end
if ARGV[3] == '1' then
  local existing = redis.call('GET', KEYS[2])
  if existing and redis.call('EXISTS', ARGV[4] .. existing) == 1 then return existing end
end
-- Entries of tasks that expired unfinished leave by their score (every time, quota or not,
-- so the set stays as small as the tenant's live tasks).
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[6])
local quota = tonumber(ARGV[5])
if quota > 0 and redis.call('ZCARD', KEYS[3]) >= quota then return '' end
if ARGV[3] == '1' then redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2]) end
redis.call('HSET', KEYS[1], unpack(ARGV, 8))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if ARGV[7] ~= '' then redis.call('ZADD', KEYS[4], tonumber(ARGV[7]), ARGV[1]) end
redis.call('ZADD', KEYS[3], tonumber(ARGV[6]) + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
return ARGV[1]
"#;

/// The record's fields, in the order the scripts return them (after a status code) and
/// `get` reads them; the result, often large, is read only when asked for.
pub(super) const FIELDS: [&str; 14] = [
    "state",
    "tenant",
    "model",
    "version",
    "attempts",
    "queued_at_ms",
    "started_at_ms",
    "finished_at_ms",
    "error_code",
    "error_message",
    "idempotency_key",
    "history",
    "callback_url",
    "webhook",
];

/// Writes the webhook delivery state ARGV[1] of task KEYS[1] (id ARGV[2]) if the task still
/// exists (an HSET alone would bring back an expired task without its TTL). Pending (ARGV[3]
/// is a time): the outbox entry (KEYS[2]) is held until then; otherwise it leaves.
pub(super) const SET_WEBHOOK: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'webhook', ARGV[1])
  if ARGV[3] ~= '' then
    redis.call('ZADD', KEYS[2], tonumber(ARGV[3]), ARGV[2])
    return 0
  end
end
redis.call('ZREM', KEYS[2], ARGV[2])
return 0
"#;

/// Claims up to ARGV[3] entries of the webhook outbox KEYS[1] due by ARGV[1] (their holder
/// stopped renewing): each still owed (task ARGV[4] .. id in a final state of ARGV[5], with a
/// callback, its delivery not ended) is held ARGV[2] ms more and answered; the others leave.
pub(super) const CLAIM_WEBHOOKS: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(due) do
  local state, callback, hook =
    unpack(redis.call('HMGET', ARGV[4] .. id, 'state', 'callback_url', 'webhook'))
  local owed = state and string.find(ARGV[5], ',' .. state .. ',', 1, true)
    and callback and callback ~= ''
  if owed and hook and hook ~= '' then
    local ok, h = pcall(cjson.decode, hook)
    if ok and type(h) == 'table' and h.state ~= 'pending' then owed = false end
  end
  if owed then
    redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), id)
    table.insert(out, id)
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
"#;

/// Prepended to the scripts below: `record(key, code)` is `{code, HMGET key FIELDS...}`, so a
/// state change answers with the record it left and needs no second read.
pub(super) fn record_prelude() -> String {
    let names: Vec<String> = FIELDS.iter().map(|f| format!("'{f}'")).collect();
    format!(
        "local F = {{{}}}\nlocal function record(key, code)\n  local r = redis.call('HMGET', key, unpack(F))\n  table.insert(r, 1, code)\n  return r\nend\n{REMEMBER}",
        names.join(", ")
    )
}

/// `remember(key, outcome, code, message, now)` appends the end of the attempt the task is
/// running to its `history` (a JSON array, the last `MAX_HISTORY` kept).
pub(super) const REMEMBER: &str = r#"
local function remember(key, outcome, code, message, now)
  local a, s, h = unpack(redis.call('HMGET', key, 'attempts', 'started_at_ms', 'history'))
  local list = {}
  if h and h ~= '' and h ~= '{}' then list = cjson.decode(h) end
  local e = {attempt = tonumber(a or '0'), started_at_ms = tonumber(s or '0'),
             ended_at_ms = tonumber(now), outcome = outcome}
  if code ~= '' then e.error_code = code; e.error_message = message end
  table.insert(list, e)
  while #list > 16 do table.remove(list, 1) end
  redis.call('HSET', key, 'history', cjson.encode(list))
end
"#;

/// Moves KEYS[1] to ARGV[1] if its state is one of ARGV[2] (comma-separated).
/// Returns record(KEYS[1], 1) on success, record(KEYS[1], 0) if the state forbids it, {-1} if
/// there is no task. Quiet (ARGV[13] == '1'): {1} on success, {0, state} when forbidden.
/// With a fence (ARGV[14], an attempt number) other than the task's attempts: {2, attempts}.
/// Leaving `running`, the attempt's end joins the history (outcome ARGV[15]). A final state
/// of a task with a callback puts it in the webhook outbox (KEYS[2]), held ARGV[16] ms for
/// the process delivering it.
pub(super) const TRANSITION: &str = r#"
local cur, tenant, attempts, callback =
  unpack(redis.call('HMGET', KEYS[1], 'state', 'tenant', 'attempts', 'callback_url'))
if not cur then return {-1} end
local quiet = ARGV[13] == '1'
if not string.find(',' .. ARGV[2] .. ',', ',' .. cur .. ',', 1, true) then
  if quiet then return {0, cur} end
  return record(KEYS[1], 0)
end
if ARGV[14] ~= '' and tonumber(attempts or '0') ~= tonumber(ARGV[14]) then
  return {2, tonumber(attempts or '0')}
end
if cur == 'running' and ARGV[1] ~= 'running' then
  remember(KEYS[1], ARGV[15], ARGV[6], ARGV[7], ARGV[5])
end
local set = {'state', ARGV[1]}
if ARGV[4] ~= '' then table.insert(set, ARGV[4]); table.insert(set, ARGV[5]) end
if ARGV[6] ~= '' then
  table.insert(set, 'error_code'); table.insert(set, ARGV[6])
  table.insert(set, 'error_message'); table.insert(set, ARGV[7])
end
if ARGV[8] == '1' then table.insert(set, 'result'); table.insert(set, ARGV[9]) end
redis.call('HSET', KEYS[1], unpack(set))
if ARGV[3] == '1' then redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
if ARGV[10] ~= '' then
  redis.call('PEXPIRE', KEYS[1], ARGV[10])
  -- Records written before tenants existed have no tenant field, and no place to free.
  if tenant then redis.call('ZREM', ARGV[11] .. tenant, ARGV[12]) end
  if callback and callback ~= '' then
    redis.call('ZADD', KEYS[2], tonumber(ARGV[5]) + tonumber(ARGV[16]), ARGV[12])
  end
end
if quiet then return {1} end
return record(KEYS[1], 1)
"#;

/// Starts each task KEYS[i] if its state is one of ARGV[2 + i] (comma-delimited, from
/// `TaskState::startable`; after a `|`, a time: a running attempt started after it is not
/// taken over) and fewer than ARGV[1] attempts were made: running, attempts + 1,
/// started at ARGV[2], its message out of the outbox (the last two ARGV: the outbox, and the
/// task keys' prefix). Answers, per key in order, record(key, 1) when started, {0} when the
/// state forbids it, record(key, 2) when the attempts are used up, {-1} if there is no task.
pub(super) const START: &str = r#"
local outbox, tp = ARGV[#ARGV - 1], ARGV[#ARGV]
local out = {}
for i, key in ipairs(KEYS) do
  local from, before = string.match(ARGV[2 + i], '^([^|]*)|?(%d*)$')
  local cur, attempts, started = unpack(redis.call('HMGET', key, 'state', 'attempts', 'started_at_ms'))
  if not cur then
    out[i] = {-1}
  elseif not string.find(from, ',' .. cur .. ',', 1, true) then
    out[i] = {0}
  elseif cur == 'running' and before ~= '' and tonumber(started or '0') > tonumber(before) then
    -- A stale duplicate: the running attempt is younger than the lease that expired.
    out[i] = {0}
  else
    attempts = tonumber(attempts or '0')
    if attempts >= tonumber(ARGV[1]) then
      out[i] = record(key, 2)
    else
      -- Taken back from a worker that never answered: that attempt was lost.
      if cur == 'running' then remember(key, 'worker lost', '', '', ARGV[2]) end
      redis.call('HSET', key, 'state', 'running', 'started_at_ms', ARGV[2], 'attempts', attempts + 1)
      -- Started: the broker delivered it, so the outbox has nothing more to keep.
      redis.call('ZREM', outbox, string.sub(key, #tp + 1))
      redis.call('HDEL', key, 'ob_payload', 'ob_priority', 'ob_traceparent', 'ob_tracestate', 'ob_sent')
      out[i] = record(key, 1)
    end
  end
end
return out
"#;

/// Withdraws task KEYS[1] (id ARGV[2]) from the outbox (KEYS[2]) and, unless a worker
/// started it (then 0), deletes it and its place among its tenant's open tasks (1).
pub(super) const WITHDRAW: &str = r#"
redis.call('ZREM', KEYS[2], ARGV[2])
local state, attempts, tenant = unpack(redis.call('HMGET', KEYS[1], 'state', 'attempts', 'tenant'))
if not state then return 1 end
if state ~= 'queued' or (attempts and attempts ~= '0') then return 0 end
redis.call('DEL', KEYS[1])
if tenant then redis.call('ZREM', ARGV[1] .. tenant, ARGV[2]) end
return 1
"#;

/// Marks task ARGV[1]'s message (hash KEYS[2]) as confirmed by the broker and due again in
/// the outbox KEYS[1] at ARGV[2], if it is still there (a worker may have started it already).
pub(super) const PUBLISHED: &str = r#"
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], tonumber(ARGV[2]), ARGV[1])
  redis.call('HSET', KEYS[2], 'ob_sent', '1')
end
return 0
"#;

/// The outbox message fields of a task's hash.
pub(super) const OUTBOX_FIELDS: [&str; 4] = [
    "ob_payload",
    "ob_priority",
    "ob_traceparent",
    "ob_tracestate",
];

/// Claims up to ARGV[4] entries of the outbox KEYS[1] due by ARGV[1] (a time, or +inf): each
/// task (ARGV[5] .. id) still queued and never started is held until ARGV[2] + ARGV[3] ms
/// and answered as {id, model, payload, priority, traceparent, tracestate}; the others leave,
/// with their message.
pub(super) const CLAIM_UNPUBLISHED: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[4]))
local out = {}
for _, id in ipairs(due) do
  local key = ARGV[5] .. id
  local state, attempts, model, p, pr, tp, ts = unpack(redis.call('HMGET', key, 'state',
    'attempts', 'model', 'ob_payload', 'ob_priority', 'ob_traceparent', 'ob_tracestate'))
  if state == 'queued' and (not attempts or attempts == '0') and p then
    redis.call('ZADD', KEYS[1], tonumber(ARGV[2]) + tonumber(ARGV[3]), id)
    table.insert(out, {id, model or '', p, pr or '', tp or '', ts or ''})
  else
    redis.call('ZREM', KEYS[1], id)
    if state then
      redis.call('HDEL', key, 'ob_payload', 'ob_priority', 'ob_traceparent', 'ob_tracestate', 'ob_sent')
    end
  end
end
return out
"#;

/// Writes a replayed record to KEYS[1] unless a task there is in another state than failed
/// (answered with that state; '' when written). ARGV[1] TTL, ARGV[2] the open set's score
/// base (now), ARGV[3] the id, ARGV[4] when it is due in the outbox (KEYS[3]), ARGV[5..] the
/// record's fields and values, its message among them.
pub(super) const REQUEUE: &str = r#"
local cur = redis.call('HGET', KEYS[1], 'state')
if cur and cur ~= 'failed' then return cur end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[3], tonumber(ARGV[4]), ARGV[3])
redis.call('ZADD', KEYS[2], tonumber(ARGV[2]) + tonumber(ARGV[1]), ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return ''
"#;
