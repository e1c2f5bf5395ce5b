//! Redis through `redis-rs`: Lua scripts so each decision is one atomic round trip across
//! replicas; every key of a job carries its portfolio as a Cluster hash tag (`{waba}`).

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};

use super::{Claim, JOB_RECORD_TTL, JobKey, Store, StoreError, WAMID_TTL, WamidRecord};
use crate::event::DeadReason;
use crate::ids::Wamid;

/// Claim a job. KEYS[1] job record; ARGV owner, now_ms, lease_ms, ttl_s, retake (0/1).
/// Returns {state, detail}.
const CLAIM: &str = r#"
local state = redis.call('HGET', KEYS[1], 'state')
local function take()
  redis.call('HSET', KEYS[1], 'state', 'claimed', 'owner', ARGV[1], 'at', ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  return {'fresh', ''}
end
if not state then return take() end
if state == 'sent' then return {'sent', redis.call('HGET', KEYS[1], 'wamid')} end
if state == 'dead' then return {'dead', ''} end
local at = redis.call('HGET', KEYS[1], 'at')
if state == 'claimed' and tonumber(ARGV[2]) - tonumber(at) < tonumber(ARGV[3]) then return {'busy', ''} end
if ARGV[5] == '1' then return take() end
redis.call('HSET', KEYS[1], 'state', 'ambiguous')
return {'ambiguous', at}
"#;

/// Change a claim held by ARGV[1] to ARGV[2] ('ambiguous' with time ARGV[3], or delete when '').
const SETTLE_CLAIM: &str = r#"
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'state') ~= 'claimed' then return 0 end
if ARGV[2] == '' then return redis.call('DEL', KEYS[1]) end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'at', ARGV[3])
return 1
"#;

/// The Redis store.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    claim: Script,
    settle: Script,
}

fn command_error(operation: &'static str) -> impl Fn(redis::RedisError) -> StoreError {
    move |e| StoreError::Command {
        operation,
        detail: e.to_string(),
    }
}

impl RedisStore {
    /// Connects (and checks the connection with a PING).
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let redacted = match url.rfind('@') {
            Some(at) => format!("redis://***@{}", &url[at + 1..]),
            None => url.to_owned(),
        };
        let unreachable = |e: redis::RedisError| StoreError::Unreachable {
            url: redacted.clone(),
            detail: e.to_string(),
        };
        let client = redis::Client::open(url).map_err(unreachable)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(3)))
            .set_number_of_retries(2);
        let mut conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(unreachable)?;
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(unreachable)?;
        Ok(RedisStore {
            conn,
            prefix: prefix.to_owned(),
            claim: Script::new(CLAIM),
            settle: Script::new(SETTLE_CLAIM),
        })
    }

    fn job_key(&self, key: &JobKey) -> String {
        format!("{}:{{{}}}:job:{}", self.prefix, key.waba, key.job_id)
    }

    fn wamid_key(&self, wamid: &Wamid) -> String {
        format!("{}:wamid:{}", self.prefix, wamid)
    }

    /// Deletes every key under this store's prefix (tests clean up after themselves).
    pub async fn delete_all(&self) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        let keys: Vec<String> = conn
            .keys(format!("{}:*", self.prefix))
            .await
            .map_err(command_error("KEYS"))?;
        if keys.is_empty() {
            return Ok(0);
        }
        conn.del(keys).await.map_err(command_error("DEL"))
    }
}

fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

#[async_trait]
impl Store for RedisStore {
    async fn claim(
        &self,
        key: &JobKey,
        owner: &str,
        now: DateTime<Utc>,
        lease: Duration,
        retake_ambiguous: bool,
    ) -> Result<Claim, StoreError> {
        let (state, detail): (String, String) = self
            .claim
            .key(self.job_key(key))
            .arg(owner)
            .arg(millis(now))
            .arg(lease.as_millis() as i64)
            .arg(JOB_RECORD_TTL.as_secs())
            .arg(if retake_ambiguous { "1" } else { "0" })
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(command_error("claim"))?;
        let bad = |what: String| StoreError::Command {
            operation: "claim",
            detail: what,
        };
        match state.as_str() {
            "fresh" => Ok(Claim::Fresh),
            "busy" => Ok(Claim::Busy),
            "dead" => Ok(Claim::Dead),
            "sent" => Wamid::parse(detail)
                .map(Claim::Sent)
                .map_err(|e| bad(e.to_string())),
            "ambiguous" => {
                let ms: i64 = detail
                    .parse()
                    .map_err(|_| bad(format!("bad claim time {detail:?}")))?;
                Utc.timestamp_millis_opt(ms)
                    .single()
                    .map(Claim::Ambiguous)
                    .ok_or_else(|| bad(format!("bad claim time {ms}")))
            }
            other => Err(bad(format!("unexpected state {other:?}"))),
        }
    }

    async fn mark_sent(
        &self,
        key: &JobKey,
        wamid: &Wamid,
        record: &WamidRecord,
    ) -> Result<(), StoreError> {
        let record = serde_json::to_string(record).expect("a WamidRecord always serialises");
        // Two hash slots (job under its portfolio tag, wamid global): a pipeline, one round trip.
        redis::pipe()
            .hset_multiple(
                self.job_key(key),
                &[("state", "sent"), ("wamid", wamid.as_str())],
            )
            .expire(self.job_key(key), JOB_RECORD_TTL.as_secs() as i64)
            .set_ex(self.wamid_key(wamid), record, WAMID_TTL.as_secs())
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(command_error("mark_sent"))
    }

    async fn mark_ambiguous(
        &self,
        key: &JobKey,
        owner: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let _: i64 = self
            .settle
            .key(self.job_key(key))
            .arg(owner)
            .arg("ambiguous")
            .arg(millis(now))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(command_error("mark_ambiguous"))?;
        Ok(())
    }

    async fn release(&self, key: &JobKey, owner: &str) -> Result<(), StoreError> {
        let _: i64 = self
            .settle
            .key(self.job_key(key))
            .arg(owner)
            .arg("")
            .arg(0)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(command_error("release"))?;
        Ok(())
    }

    async fn mark_dead(&self, key: &JobKey, reason: DeadReason) -> Result<(), StoreError> {
        redis::pipe()
            .hset_multiple(
                self.job_key(key),
                &[("state", "dead"), ("reason", reason.as_str())],
            )
            .expire(self.job_key(key), JOB_RECORD_TTL.as_secs() as i64)
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(command_error("mark_dead"))
    }

    async fn wamid(&self, wamid: &Wamid) -> Result<Option<WamidRecord>, StoreError> {
        let raw: Option<String> = self
            .conn
            .clone()
            .get(self.wamid_key(wamid))
            .await
            .map_err(command_error("GET"))?;
        raw.map(|r| {
            serde_json::from_str(&r).map_err(|e| StoreError::Command {
                operation: "wamid",
                detail: e.to_string(),
            })
        })
        .transpose()
    }
}
