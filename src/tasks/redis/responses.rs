//! A decoupled model's responses kept with their task: a Redis list beside the record
//! (`<prefix>:task:<id>:responses`), appended by one script so that a late attempt, a
//! cancelled task or a list over the size limit is refused atomically.

use std::sync::OnceLock;

use bytes::Bytes;
use redis::{Script, Value};

use super::{RedisTaskStore, backend};
use crate::tasks::{Kept, StoreError, TaskState};

/// KEYS[1] the record, KEYS[2] its responses; ARGV[1] the attempt (fence), ARGV[2] the
/// response, ARGV[3] the byte limit of all responses together. Answers {code, state, n}:
/// code ≥ 0 the list's length; -1 no task; -2 not running; -3 fenced (n: the attempt now);
/// -4 over the limit (n: the size it would have).
const APPEND: &str = r#"
local f = redis.call('HMGET', KEYS[1], 'state', 'attempts', 'responses_attempt', 'responses_bytes')
if not f[1] then return {-1, '', '0'} end
if f[2] ~= ARGV[1] then return {-3, f[1], f[2]} end
if f[1] ~= 'running' then return {-2, f[1], f[2]} end
local bytes = tonumber(f[4] or '0')
if f[3] ~= ARGV[1] then
  redis.call('DEL', KEYS[2])
  bytes = 0
end
bytes = bytes + string.len(ARGV[2])
if bytes > tonumber(ARGV[3]) then return {-4, f[1], tostring(bytes)} end
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[1], 'responses_attempt', ARGV[1], 'responses_bytes', bytes)
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return {redis.call('LLEN', KEYS[2]), f[1], f[2]}
"#;

fn append_script() -> &'static Script {
    static S: OnceLock<Script> = OnceLock::new();
    S.get_or_init(|| Script::new(APPEND))
}

impl RedisTaskStore {
    pub(super) async fn append(&self, id: &str, fence: u32, resp: Bytes) -> Result<(), StoreError> {
        // Not repeated on a new connection: a second run would keep the response twice.
        let mut conn = self.conn.clone();
        let (code, state, n): (i64, String, String) = append_script()
            .key(self.key(id))
            .key(self.responses_key(id))
            .arg(fence)
            .arg(resp.as_ref())
            .arg(self.max_result_bytes)
            .invoke_async(&mut conn)
            .await
            .map_err(backend)?;
        let id = id.to_string();
        match code {
            c if c >= 0 => Ok(()),
            -1 => Err(StoreError::NotFound(id)),
            -2 => Err(StoreError::Conflict {
                id,
                from: TaskState::parse(&state).unwrap_or(TaskState::Running),
                to: TaskState::Running,
            }),
            -3 => Err(StoreError::Fenced {
                id,
                fence,
                current: n.parse().unwrap_or(0),
            }),
            _ => Err(StoreError::ResultTooLarge {
                size: n.parse().unwrap_or(usize::MAX),
                limit: self.max_result_bytes,
            }),
        }
    }

    pub(super) async fn read(
        &self,
        id: &str,
        from: usize,
        max: usize,
    ) -> Result<Option<Kept>, StoreError> {
        if max == 0 {
            return Ok(None);
        }
        let mut conn = self.repeatable();
        let (fields, list): (Vec<Value>, Vec<Vec<u8>>) = redis::pipe()
            .cmd("HMGET")
            .arg(self.key(id))
            .arg("state")
            .arg("responses_attempt")
            .cmd("LRANGE")
            .arg(self.responses_key(id))
            .arg(from)
            .arg(from + max - 1)
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        let text = |v: Option<&Value>| match v {
            Some(Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        };
        if text(fields.first()).is_none() {
            return Ok(None);
        }
        let Some(attempt) = text(fields.get(1)).and_then(|a| a.parse().ok()) else {
            return Ok(Some(Kept::default()));
        };
        Ok(Some(Kept {
            attempt,
            responses: list.into_iter().map(Bytes::from).collect(),
        }))
    }
}
