//! Redis through `redis-rs`. Admission is one Lua script ([`admit.lua`](./admit.lua)), so each
//! decision is one atomic round trip across replicas.
//!
//! Key schema (`<p>` is `redis.key_prefix`; `{<waba>}` is a Redis Cluster hash tag, so every key
//! one admission touches lives on one shard):
//!
//! | key | holds | expires |
//! |---|---|---|
//! | `<p>:{<waba>}:job:<job_id>` | hash `state` (claimed/ambiguous/sent/dead), `owner`, `at`, `wamid`, `reason` | 8 days |
//! | `<p>:{<waba>}:deferred:<job_id>` | hash `at`, `until` (ms), `cause`: the job's latest deferral | 8 days |
//! | `<p>:{<waba>}:wamid:<wamid>` | hash `record` (JSON: job_id, campaign_id, traceparent, metadata), `status` (last applied, monotonic, compare-and-set), `priced` | 30 days after the last status |
//! | `<p>:{<waba>}:report` | hash of counters over every job: `accepted`, `status:<s>`, `dead:<reason>`, `billable:<category>`, `cost:<category>` (millionths) | durable |
//! | `<p>:{<waba>}:report:<campaign>` | the same counters for one campaign | durable |
//! | `<p>:{<waba>}:window:<pnid>:<wa_id>` | last inbound message, ms | 24 h after it |
//! | `<p>:{<waba>}:consent:<wa_id>` | hash `opt_in_at`, `opt_in_source`, `opt_out_at`, `opt_out_source` | durable |
//! | `<p>:{<waba>}:campaign:<id>` | hash `state` (active/paused/cancelled), `at` | durable |
//! | `<p>:{<waba>}:tpl:<name>:<lang>` | hash `status`, `category`, `def` (the definition, JSON) | until a sync drops it |
//! | `<p>:{<waba>}:templates` | set of `<name>:<lang>` in the registry | durable |
//! | `<p>:{<waba>}:templates:synced` | time of the last sync, ms | durable |
//! | `<p>:{<waba>}:tier` | sorted set wa_id → last send outside the window, ms | 24 h after the last |
//! | `<p>:{<waba>}:tier:limit` | the portfolio's tier (`unlimited` or a number), from a webhook | durable |
//! | `<p>:{<waba>}:displays` | hash display number (digits) → phone_number_id, as `messages` webhooks pair them | durable |
//! | `<p>:{<waba>}:pair:<pnid>:<wa_id>` | hash `next`, `start`, `count` (pair-rate burst) | at `next` |
//! | `<p>:{<waba>}:pace:<pnid>` | hash `next` (the number's next free send slot, µs), `speed` (permille) and `slow_until` (ms) after a 130429 | a day |
//! | `<p>:{global}:throughput:<pnid>` | the number's throughput, msg/s, from a webhook | durable |
//! | `<p>:{global}:replicas:<group>` | sorted set replica → last heartbeat, ms | 10 × heartbeat ttl |
//! | `<p>:halts` | hash scope → the halt an error raised (JSON); `<scope>\|<condition>` → the halt an account webhook raised | durable, lifted by hand, by a webhook, or when it ends |
//! | `<p>:lock:<name>` | owner (e.g. the replica syncing templates) | its ttl |

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{AsyncCommands, Cmd, Pipeline, RedisFuture, Value};

mod call;

use super::{
    Booked, Deferral, Halt, HaltScope, Heartbeat, JOB_RECORD_TTL, JobKey, Live, Message, Report,
    SlotAsk, Store, StoreError, Subject, Tally, WAMID_TTL, WamidRecord,
};
use crate::event::DeadReason;
use crate::ids::{CampaignId, PhoneNumberId, WaId, WabaId, Wamid};
use crate::job::Category;
use crate::policy::admission::{
    self, CampaignState, Consent, DeadWhy, DeferReason, JobState, Mark, Request, Verdict,
};
use crate::policy::template::TemplateDefinition;
use call::{Call, Lua};

/// Books the number's next send slot in the schedule at `key`: one `interval` µs (longer while
/// slowed down) after the last one booked, or `now` µs; returns the wait in µs. The same rule
/// as `PaceState::book`.
const BOOK_SLOT_FN: &str = r#"
local function book_slot(key, now, interval)
  local pc = redis.call('HMGET', key, 'next', 'speed', 'slow_until')
  if pc[2] and pc[3] and math.floor(now / 1000) < tonumber(pc[3]) then
    local speed = math.min(math.max(tonumber(pc[2]), 500), 1000)
    interval = math.floor(interval * 1000 / speed)
  end
  local at = now
  if pc[1] and tonumber(pc[1]) > at then at = tonumber(pc[1]) end
  redis.call('HSET', key, 'next', string.format('%.0f', at + interval))
  redis.call('PEXPIRE', key, 86400000)
  return at - now
end
"#;

/// Books a slot alone. KEYS: 1 the schedule. ARGV: 1 now µs, 2 interval µs.
const BOOK_SLOT: &str =
    "return string.format('%.0f', book_slot(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])))";

/// Decides admission first: a refusal or deferral is returned at once, with no slot booked (it
/// would take a send slot from a job that can go). A job that may go books its slot, and is
/// claimed and charged when the slot comes within ARGV[26] µs. KEYS: 1-9 as admit.lua, 10 the
/// schedule. ARGV: 1-23 as admit.lua, 24 now µs, 25 interval µs, 26 within µs.
/// Reply: {'later', wait µs} | {wait µs, admit.lua's reply...} (wait 0 for a refusal).
const BOOK_AND_ADMIT: &str = r#"
local reply, charge = admit()
if reply[1] ~= 'send' then
  table.insert(reply, 1, '0')
  return reply
end
local wait = book_slot(KEYS[10], tonumber(ARGV[24]), tonumber(ARGV[25]))
if wait > tonumber(ARGV[26]) then return {'later', string.format('%.0f', wait)} end
charge()
table.insert(reply, 1, string.format('%.0f', wait))
return reply
"#;

/// A 130429: the number's send schedule a tenth slower (down to half) for ARGV[2] ms; the same
/// rule as `PaceState::throttled`. KEYS: 1 the schedule. ARGV: 1 now ms, 2 cool-down ms.
const THROTTLED: &str = r#"
local pc = redis.call('HMGET', KEYS[1], 'speed', 'slow_until')
local now = tonumber(ARGV[1])
local speed = 1000
if pc[1] and pc[2] and now < tonumber(pc[2]) then speed = math.min(math.max(tonumber(pc[1]), 500), 1000) end
speed = math.max(math.floor(speed * 900 / 1000), 500)
redis.call('HSET', KEYS[1], 'speed', speed, 'slow_until', string.format('%.0f', now + tonumber(ARGV[2])))
redis.call('PEXPIRE', KEYS[1], 86400000)
return speed
"#;

/// A job Meta accepted: its record says sent, its wamid leads back to it, its reports count it.
/// One script, so Redis runs one command instead of a transaction of seven.
/// KEYS: 1 job record, 2 the wamid's message, 3.. report hashes. ARGV: 1 wamid, 2 job record
/// ttl s, 3 the message's record (JSON), 4 its ttl s.
const MARK_SENT: &str = r#"
redis.call('HSET', KEYS[1], 'state', 'sent', 'wamid', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[2], 'record', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[4])
for i = 3, #KEYS do redis.call('HINCRBY', KEYS[i], 'accepted', 1) end
return redis.status_reply('OK')
"#;

/// Change a claim held by ARGV[1] to ARGV[2] ('ambiguous' with time ARGV[3], or delete when '').
const SETTLE_CLAIM: &str = r#"
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'state') ~= 'claimed' then return 0 end
if ARGV[2] == '' then return redis.call('DEL', KEYS[1]) end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'at', ARGV[3])
return 1
"#;

/// Keep the latest inbound time (webhooks arrive out of order). KEYS[1] window; ARGV at, window ms.
const INBOUND: &str = r#"
local last = redis.call('GET', KEYS[1])
if last and tonumber(last) >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PXAT', tonumber(ARGV[1]) + tonumber(ARGV[2]))
return 1
"#;

/// Set a known template's status. KEYS[1] template; ARGV status.
const TEMPLATE_STATUS: &str = "if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('HSET', KEYS[1], 'status', ARGV[1]) end return 0";

/// Set a template's category if its definition is still the one read. KEYS[1] template; ARGV:
/// 1 the definition read, 2 the category as admission reads it, 3 the definition with it.
/// Reply: 1 set, 0 the definition changed meanwhile (a sync), -1 no such template.
const TEMPLATE_CATEGORY: &str = r#"
local def = redis.call('HGET', KEYS[1], 'def')
if not def then return -1 end
if def ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'category', ARGV[2], 'def', ARGV[3])
return 1
"#;

/// Lift every halt of scope ARGV[1]: its field, and each `<scope>|<condition>`. KEYS[1] halts.
const LIFT_HALTS: &str = r#"
local n = redis.call('HDEL', KEYS[1], ARGV[1])
local prefix = ARGV[1] .. '|'
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(field, 1, #prefix) == prefix then n = n + redis.call('HDEL', KEYS[1], field) end
end
return n
"#;

/// Record a job dead once and count it. KEYS[1] job, KEYS[2..] reports; ARGV reason, ttl s.
const MARK_DEAD: &str = r#"
if redis.call('HGET', KEYS[1], 'state') == 'dead' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'dead', 'reason', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
for i = 2, #KEYS do redis.call('HINCRBY', KEYS[i], 'dead:' .. ARGV[1], 1) end
return 1
"#;

/// Set a message's status to ARGV[2] if it is still ARGV[1] ('' = none) and count it.
/// KEYS[1] message, KEYS[2..] reports; ARGV[3] ttl s, ARGV[4] cost category ('' = not billable),
/// ARGV[5] cost, millionths; ARGV[6..] statuses reached.
const APPLY_STATUS: &str = r#"
if (redis.call('HGET', KEYS[1], 'status') or '') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
local priced = ARGV[4] ~= '' and redis.call('HSETNX', KEYS[1], 'priced', '1') == 1
for i = 2, #KEYS do
  for j = 6, #ARGV do redis.call('HINCRBY', KEYS[i], 'status:' .. ARGV[j], 1) end
  if priced then
    redis.call('HINCRBY', KEYS[i], 'billable:' .. ARGV[4], 1)
    redis.call('HINCRBY', KEYS[i], 'cost:' .. ARGV[4], ARGV[5])
  end
end
return 1
"#;

/// Delete a job record that says sent with wamid ARGV[1].
const REOPEN: &str = "if redis.call('HGET', KEYS[1], 'state') == 'sent' and redis.call('HGET', KEYS[1], 'wamid') == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

/// Delete a job record if it says dead.
const REOPEN_DEAD: &str = "if redis.call('HGET', KEYS[1], 'state') == 'dead' then return redis.call('DEL', KEYS[1]) end return 0";

/// Delete a lock if ARGV[1] holds it.
const UNLOCK: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

/// A connection to one Redis (reconnecting by itself) or to a Redis Cluster (following its
/// slots and failovers by itself); every command of the store goes through it.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Where the store's data lives: one Redis, or the seed nodes of a Redis Cluster.
#[derive(Debug, Clone, Copy)]
pub enum Deployment<'a> {
    /// `redis://host:port/db`.
    Single(&'a str),
    /// Some nodes of a Redis Cluster (`redis://host:port` each); the client learns the rest.
    Cluster(&'a [String]),
}

/// Room for the part of a key after its hash tag (`window:<number>:<wa_id>`, `job:<job_id>`):
/// longer ones (a long template name) grow once.
const KEY_REST: usize = 64;

/// The store's key names (see the table at the top): one prefix, and the portfolio's hash tag
/// on every key one request touches together.
#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn tagged(&self, waba: &WabaId, rest: std::fmt::Arguments<'_>) -> String {
        self.key(waba.as_str(), rest)
    }

    /// A key of the replicas' shared state, read together in one heartbeat: they share the
    /// `{global}` hash tag, so a Redis Cluster keeps them in one slot.
    fn global(&self, rest: std::fmt::Arguments<'_>) -> String {
        self.key("global", rest)
    }

    /// `<prefix>:{<tag>}:<rest>` in one allocation. `format!` sizes a string from its literal
    /// parts alone, so each key grew three or four times: about 35 allocations per admission.
    fn key(&self, tag: &str, rest: std::fmt::Arguments<'_>) -> String {
        let literal = rest.as_str().map_or(KEY_REST, str::len);
        let mut key = String::with_capacity(self.prefix.len() + tag.len() + 4 + literal);
        write!(key, "{}:{{{tag}}}:{rest}", self.prefix).expect("a String takes any write");
        key
    }

    fn replicas_key(&self, group: &str) -> String {
        self.global(format_args!("replicas:{group}"))
    }

    fn throughput_key(&self, number: &PhoneNumberId) -> String {
        self.global(format_args!("throughput:{number}"))
    }

    fn job_key(&self, key: &JobKey) -> String {
        self.tagged(&key.waba, format_args!("job:{}", key.job_id))
    }

    /// The job's latest deferral: a key of its own, as releasing a claim deletes the record.
    fn deferral_key(&self, key: &JobKey) -> String {
        self.tagged(&key.waba, format_args!("deferred:{}", key.job_id))
    }

    fn message_key(&self, waba: &WabaId, wamid: &Wamid) -> String {
        self.tagged(waba, format_args!("wamid:{wamid}"))
    }

    /// The portfolio's report and, for a campaign's job, the campaign's.
    fn report_keys(&self, waba: &WabaId, campaign: Option<&str>) -> Vec<String> {
        let mut keys = vec![self.tagged(waba, format_args!("report"))];
        keys.extend(campaign.map(|c| self.tagged(waba, format_args!("report:{c}"))));
        keys
    }

    fn pace_key(&self, waba: &WabaId, number: &PhoneNumberId) -> String {
        self.tagged(waba, format_args!("pace:{number}"))
    }

    fn window_key(&self, waba: &WabaId, number: &PhoneNumberId, to: &WaId) -> String {
        self.tagged(waba, format_args!("window:{number}:{to}"))
    }

    fn consent_key(&self, waba: &WabaId, to: &WaId) -> String {
        self.tagged(waba, format_args!("consent:{to}"))
    }

    fn campaign_key(&self, waba: &WabaId, campaign: &str) -> String {
        self.tagged(waba, format_args!("campaign:{campaign}"))
    }

    fn template_key(&self, waba: &WabaId, name: &str, language: &str) -> String {
        self.tagged(waba, format_args!("tpl:{name}:{language}"))
    }

    fn tier_limit_key(&self, waba: &WabaId) -> String {
        self.tagged(waba, format_args!("tier:limit"))
    }

    fn displays_key(&self, waba: &WabaId) -> String {
        self.tagged(waba, format_args!("displays"))
    }

    /// admit.lua's keys (KEYS[1..9]) for a job's admission, all under its portfolio's tag.
    fn admission(&self, subject: &Subject) -> [String; 9] {
        let waba = &subject.job.waba;
        let (name, language) = subject
            .template
            .as_ref()
            .map(|(n, l)| (n.as_str(), l.as_str()))
            .unwrap_or(("", ""));
        let campaign = subject.campaign.as_ref().map_or("", |c| c.as_str());
        [
            self.job_key(&subject.job),
            self.window_key(waba, &subject.number, &subject.to),
            self.consent_key(waba, &subject.to),
            self.campaign_key(waba, campaign),
            self.template_key(waba, name, language),
            self.tagged(waba, format_args!("templates:synced")),
            self.tagged(waba, format_args!("tier")),
            self.tier_limit_key(waba),
            self.tagged(waba, format_args!("pair:{}:{}", subject.number, subject.to)),
        ]
    }

    /// MARK_SENT's keys: the job's record, its message, its reports.
    fn sent(&self, key: &JobKey, wamid: &Wamid, campaign: Option<&str>) -> Vec<String> {
        let mut keys = vec![self.job_key(key), self.message_key(&key.waba, wamid)];
        keys.extend(self.report_keys(&key.waba, campaign));
        keys
    }

    /// MARK_DEAD's keys: the job's record and its reports.
    fn dead(&self, key: &JobKey, campaign: Option<&str>) -> Vec<String> {
        let mut keys = vec![self.job_key(key)];
        keys.extend(self.report_keys(&key.waba, campaign));
        keys
    }

    /// APPLY_STATUS's keys: the message, and its reports when it is counted (`Some`, with its
    /// campaign).
    fn status(&self, waba: &WabaId, wamid: &Wamid, report: Option<Option<&str>>) -> Vec<String> {
        let mut keys = vec![self.message_key(waba, wamid)];
        if let Some(campaign) = report {
            keys.extend(self.report_keys(waba, campaign));
        }
        keys
    }

    /// `<prefix>:halts`: scope → halt (JSON).
    fn halts_key(&self) -> String {
        format!("{}:halts", self.prefix)
    }
}

/// The Redis store.
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    keys: Keys,
    admit: Lua,
    book_slot: Lua,
    book_and_admit: Lua,
    mark_sent: Lua,
    throttle: Lua,
    settle: Lua,
    inbound: Lua,
    template_status: Lua,
    template_category: Lua,
    lift_halts: Lua,
    unlock: Lua,
    mark_dead: Lua,
    reopen: Lua,
    reopen_dead: Lua,
    apply_status: Lua,
    round_trips: Arc<AtomicU64>,
}

fn command_error(operation: &'static str) -> impl Fn(redis::RedisError) -> StoreError {
    move |e| StoreError::Command {
        operation,
        detail: e.to_string(),
    }
}

fn bad_reply(operation: &'static str, detail: impl Into<String>) -> StoreError {
    StoreError::Command {
        operation,
        detail: detail.into(),
    }
}

fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_millis(operation: &'static str, ms: &str) -> Result<DateTime<Utc>, StoreError> {
    ms.parse::<i64>()
        .ok()
        .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
        .ok_or_else(|| bad_reply(operation, format!("bad time {ms:?}")))
}

impl RedisStore {
    /// Connects to one Redis (and checks the connection with a PING).
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
        Self::connect_to(Deployment::Single(url), prefix).await
    }

    /// Connects to one Redis or a Redis Cluster (and checks the connection with a PING).
    pub async fn connect_to(at: Deployment<'_>, prefix: &str) -> Result<Self, StoreError> {
        let redact = |url: &str| match url.rfind('@') {
            Some(at) => format!("redis://***@{}", &url[at + 1..]),
            None => url.to_owned(),
        };
        let redacted = match at {
            Deployment::Single(url) => redact(url),
            Deployment::Cluster(nodes) => nodes
                .iter()
                .map(|n| redact(n))
                .collect::<Vec<_>>()
                .join(", "),
        };
        let unreachable = |e: redis::RedisError| StoreError::Unreachable {
            url: redacted.clone(),
            detail: e.to_string(),
        };
        let mut conn = match at {
            Deployment::Single(url) => {
                let client = redis::Client::open(url).map_err(unreachable)?;
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(3)))
                    .set_number_of_retries(2);
                let manager = ConnectionManager::new_with_config(client, config)
                    .await
                    .map_err(unreachable)?;
                Conn::Single(manager)
            }
            Deployment::Cluster(nodes) => {
                // CORRECTNESS: a failover moves a master's slots to its replica within seconds;
                // a command meanwhile is retried (moved, refused, or its connection lost) with
                // backoff for about that long before it fails and its job is deferred.
                let client = redis::cluster::ClusterClientBuilder::new(nodes.to_vec())
                    .connection_timeout(Duration::from_secs(3))
                    .response_timeout(Duration::from_secs(3))
                    .retries(6)
                    .min_retry_wait(100)
                    .max_retry_wait(2_000)
                    .build()
                    .map_err(unreachable)?;
                Conn::Cluster(client.get_async_connection().await.map_err(unreachable)?)
            }
        };
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(unreachable)?;
        Ok(RedisStore {
            conn,
            keys: Keys {
                prefix: prefix.to_owned(),
            },
            admit: Lua::new(&format!(
                "local check_only = false\n{}",
                include_str!("admit.lua")
            )),
            book_slot: Lua::new(&format!("{BOOK_SLOT_FN}\n{BOOK_SLOT}")),
            book_and_admit: Lua::new(&format!(
                "{BOOK_SLOT_FN}\nlocal check_only = true\nlocal function admit()\n{}\nend\n{BOOK_AND_ADMIT}",
                include_str!("admit.lua")
            )),
            mark_sent: Lua::new(MARK_SENT),
            throttle: Lua::new(THROTTLED),
            settle: Lua::new(SETTLE_CLAIM),
            inbound: Lua::new(INBOUND),
            template_status: Lua::new(TEMPLATE_STATUS),
            template_category: Lua::new(TEMPLATE_CATEGORY),
            lift_halts: Lua::new(LIFT_HALTS),
            unlock: Lua::new(UNLOCK),
            mark_dead: Lua::new(MARK_DEAD),
            reopen: Lua::new(REOPEN),
            reopen_dead: Lua::new(REOPEN_DEAD),
            apply_status: Lua::new(APPLY_STATUS),
            round_trips: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Requests sent to Redis so far (a script, a command or a pipeline each count once).
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    /// The connection for one round trip (counted).
    fn conn(&self) -> Conn {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        self.conn.clone()
    }

    /// Whether Redis keeps its data on disk (AOF, or RDB save points); `None` when it will not
    /// say (`CONFIG` disabled, as on some managed services).
    pub async fn persists(&self) -> Result<Option<bool>, StoreError> {
        let mut conn = self.conn();
        let config = |name: &'static str| redis::cmd("CONFIG").arg("GET").arg(name).clone();
        let aof: redis::RedisResult<Vec<String>> =
            config("appendonly").query_async(&mut conn).await;
        let save: redis::RedisResult<Vec<String>> = config("save").query_async(&mut conn).await;
        match (aof, save) {
            (Ok(aof), Ok(save)) => {
                let aof = aof.get(1).is_some_and(|v| v == "yes");
                let rdb = save.get(1).is_some_and(|v| !v.trim().is_empty());
                Ok(Some(aof || rdb))
            }
            (Err(e), _) | (_, Err(e)) if e.is_io_error() || e.is_connection_dropped() => {
                Err(command_error("config get")(e))
            }
            _ => Ok(None),
        }
    }

    /// Deletes every key under this store's prefix (tests clean up after themselves).
    pub async fn delete_all(&self) -> Result<u64, StoreError> {
        let keys: Vec<String> = self
            .conn()
            .keys(format!("{}:*", self.keys.prefix))
            .await
            .map_err(command_error("KEYS"))?;
        if keys.is_empty() {
            return Ok(0);
        }
        self.conn().del(keys).await.map_err(command_error("DEL"))
    }
}

fn opt_ms(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| millis(t).to_string()).unwrap_or_default()
}

/// Turns the script's reply into the verdict [`admission::admit`] would give.
fn verdict(reply: &[String], req: &Request) -> Result<Verdict, StoreError> {
    let bad = |what: &str| bad_reply("admit", format!("{what}: {reply:?}"));
    let arg = |i: usize| {
        reply
            .get(i)
            .map(String::as_str)
            .ok_or_else(|| bad("short reply"))
    };
    let time = |i: usize| from_millis("admit", arg(i)?);
    Ok(match arg(0)? {
        "send" => Verdict::Send {
            fallback: arg(1)? == "1",
        },
        "sent" => Verdict::AlreadySent(Wamid::parse(arg(1)?).map_err(|e| bad(&e.to_string()))?),
        "done" => Verdict::AlreadyDead,
        "ambiguous" => Verdict::Ambiguous(time(1)?),
        "defer" => Verdict::Defer {
            until: time(2)?,
            why: match arg(1)? {
                "busy" => DeferReason::ClaimedElsewhere,
                "not_before" => DeferReason::NotBefore,
                "campaign_paused" => DeferReason::CampaignPaused,
                "template_paused" => DeferReason::TemplatePaused,
                "registry" => DeferReason::RegistryNotSynced,
                "pair" => DeferReason::PairRate,
                "tier" => DeferReason::TierExhausted {
                    used: arg(3)?.parse().map_err(|_| bad("tier used"))?,
                    limit: arg(4)?.parse().map_err(|_| bad("tier limit"))?,
                },
                _ => return Err(bad("unknown deferral")),
            },
        },
        "dead" => Verdict::Dead(match arg(1)? {
            "expired" => DeadWhy::Expired(time(2)?),
            "campaign_cancelled" => DeadWhy::CampaignCancelled,
            "window" => DeadWhy::OutsideCareWindow {
                last_inbound: match arg(2)? {
                    "" => None,
                    ms => Some(from_millis("admit", ms)?),
                },
            },
            "template_unknown" => DeadWhy::TemplateUnknown,
            "template_status" => DeadWhy::TemplateNotApproved {
                status: arg(2)?.to_owned(),
            },
            "params" => DeadWhy::TemplateParams(
                req.template
                    .as_ref()
                    .and_then(|t| t.params.clone())
                    .unwrap_or_default(),
            ),
            "opted_out" => DeadWhy::OptedOut(Mark {
                at: time(2)?,
                source: arg(3).unwrap_or("").to_owned(),
            }),
            "no_opt_in" => {
                DeadWhy::NoOptIn(Category::parse(arg(2)?).ok_or_else(|| bad("category"))?)
            }
            _ => return Err(bad("unknown dead letter")),
        }),
        _ => return Err(bad("unknown verdict")),
    })
}

impl RedisStore {
    /// `script` invoked with admit.lua's keys and arguments for `subject` and `req`; with
    /// `pace`, the number's schedule as a tenth key, for a script that books a slot too.
    fn admission<'a>(
        &self,
        script: &'a Lua,
        subject: &Subject,
        req: &Request,
        pace: Option<&str>,
    ) -> Call<'a> {
        let mut opt_in = String::from(",");
        for category in [
            Category::Marketing,
            Category::Utility,
            Category::Authentication,
        ] {
            if req.opt_in.requires(category) {
                opt_in.push_str(category.as_str());
                opt_in.push(',');
            }
        }
        let used = match &req.template {
            None => "",
            Some(t) if t.fallback => "fallback",
            Some(_) => "job",
        };
        let ms = |d: Duration| d.as_millis() as u64;
        let keys = self.keys.admission(subject);
        let mut invocation = script.call(keys.len() + usize::from(pace.is_some()));
        for key in keys.iter().map(String::as_str).chain(pace) {
            invocation.key(key);
        }
        invocation
            .arg(&req.owner)
            .arg(millis(req.now))
            .arg(ms(req.lease))
            .arg(JOB_RECORD_TTL.as_secs())
            .arg(u8::from(req.retake_ambiguous))
            .arg(opt_ms(req.expires_at))
            .arg(opt_ms(req.not_before))
            .arg(u8::from(req.free_form))
            .arg(used)
            .arg(u8::from(
                req.template.as_ref().is_some_and(|t| t.params.is_some()),
            ))
            .arg(opt_in)
            .arg(req.tier_limit.map(|l| l.to_string()).unwrap_or_default())
            .arg(ms(req.pair.period))
            .arg(req.pair.burst)
            .arg(ms(admission::CARE_WINDOW))
            .arg(ms(admission::TIER_WINDOW))
            .arg(u8::from(subject.campaign.is_some()))
            .arg(subject.to.as_str())
            .arg(ms(admission::BUSY_RECHECK))
            .arg(ms(req.campaign_recheck))
            .arg(ms(req.template_recheck))
            .arg(ms(admission::REGISTRY_RECHECK))
            .arg(ms(req.pair.margin));
        invocation
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn admit(&self, subject: &Subject, req: &Request) -> Result<Verdict, StoreError> {
        let reply: Vec<String> = self
            .admission(&self.admit, subject, req, None)
            .invoke_async(&mut self.conn())
            .await
            .map_err(command_error("admit"))?;
        verdict(&reply, req)
    }

    async fn book_and_admit(
        &self,
        subject: &Subject,
        req: &Request,
        ask: &SlotAsk,
    ) -> Result<Booked, StoreError> {
        let pace = self.keys.pace_key(&subject.job.waba, &subject.number);
        let reply: Vec<String> = self
            .admission(&self.book_and_admit, subject, req, Some(&pace))
            .arg(ask.now.timestamp_micros())
            .arg(ask.interval.as_micros() as u64)
            .arg(ask.within.as_micros() as u64)
            .invoke_async(&mut self.conn())
            .await
            .map_err(command_error("book_and_admit"))?;
        let bad = || bad_reply("book_and_admit", format!("{reply:?}"));
        let micros = |s: &String| s.parse().map(Duration::from_micros).map_err(|_| bad());
        match reply.split_first() {
            Some((kind, [wait])) if kind == "later" => Ok(Booked::Later(micros(wait)?)),
            Some((wait, admitted)) => Ok(Booked::Admitted {
                wait: micros(wait)?,
                verdict: verdict(admitted, req)?,
            }),
            None => Err(bad()),
        }
    }

    async fn mark_sent(
        &self,
        key: &JobKey,
        wamid: &Wamid,
        record: &WamidRecord,
    ) -> Result<(), StoreError> {
        // Sized for a record with its trace context and some metadata, so it grows rarely.
        let mut json = Vec::with_capacity(512);
        serde_json::to_writer(&mut json, record).expect("a WamidRecord always serialises");
        let keys = self.keys.sent(key, wamid, record.campaign_id.as_deref());
        let mut invocation = self.mark_sent.keys(&keys);
        invocation
            .arg(wamid.as_str())
            .arg(JOB_RECORD_TTL.as_secs())
            .arg(json)
            .arg(WAMID_TTL.as_secs());
        invocation
            .invoke_async::<()>(&mut self.conn())
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
            .key(self.keys.job_key(key))
            .arg(owner)
            .arg("ambiguous")
            .arg(millis(now))
            .invoke_async(&mut self.conn())
            .await
            .map_err(command_error("mark_ambiguous"))?;
        Ok(())
    }

    async fn reopen(&self, key: &JobKey, wamid: &Wamid) -> Result<bool, StoreError> {
        let deleted: i64 = self
            .reopen
            .key(self.keys.job_key(key))
            .arg(wamid.as_str())
            .invoke_async(&mut self.conn())
            .await
            .map_err(command_error("reopen"))?;
        Ok(deleted == 1)
    }

    async fn reopen_dead(&self, key: &JobKey) -> Result<bool, StoreError> {
        let deleted: i64 = self
            .reopen_dead
            .key(self.keys.job_key(key))
            .invoke_async(&mut self.conn())
            .await
            .map_err(command_error("reopen_dead"))?;
        Ok(deleted == 1)
    }

    async fn job(&self, key: &JobKey) -> Result<Option<JobState>, StoreError> {
        const OP: &str = "job";
        let fields: std::collections::HashMap<String, String> = self
            .conn()
            .hgetall(self.keys.job_key(key))
            .await
            .map_err(command_error(OP))?;
        let field = |name: &str| {
            fields
                .get(name)
                .ok_or_else(|| bad_reply(OP, format!("job record without {name}")))
        };
        let Some(state) = fields.get("state") else {
            return Ok(None);
        };
        Ok(Some(match state.as_str() {
            "claimed" => JobState::Claimed {
                owner: field("owner")?.clone(),
                at: from_millis(OP, field("at")?)?,
            },
            "ambiguous" => JobState::Ambiguous {
                at: from_millis(OP, field("at")?)?,
            },
            "sent" => JobState::Sent(
                Wamid::parse(field("wamid")?.as_str()).map_err(|e| bad_reply(OP, e.to_string()))?,
            ),
            "dead" => JobState::Dead,
            other => return Err(bad_reply(OP, format!("job state {other:?}"))),
        }))
    }

    async fn note_deferral(&self, key: &JobKey, deferral: &Deferral) -> Result<(), StoreError> {
        let key = self.keys.deferral_key(key);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset_multiple(
                &key,
                &[
                    ("at", millis(deferral.at).to_string()),
                    ("until", millis(deferral.until).to_string()),
                    ("cause", deferral.cause.clone()),
                ],
            )
            .ignore()
            .expire(&key, JOB_RECORD_TTL.as_secs() as i64)
            .ignore();
        pipe.query_async::<()>(&mut self.conn())
            .await
            .map_err(command_error("note_deferral"))
    }

    async fn deferral(&self, key: &JobKey) -> Result<Option<Deferral>, StoreError> {
        const OP: &str = "deferral";
        let fields: std::collections::HashMap<String, String> = self
            .conn()
            .hgetall(self.keys.deferral_key(key))
            .await
            .map_err(command_error(OP))?;
        let (Some(at), Some(until)) = (fields.get("at"), fields.get("until")) else {
            return Ok(None);
        };
        Ok(Some(Deferral {
            at: from_millis(OP, at)?,
            until: from_millis(OP, until)?,
            cause: fields.get("cause").cloned().unwrap_or_default(),
        }))
    }

    async fn release(&self, key: &JobKey, owner: &str) -> Result<(), StoreError> {
        let _: i64 = self
            .settle
            .key(self.keys.job_key(key))
            .arg(owner)
            .arg("")
            .arg(0)
            .invoke_async(&mut self.conn())
            .await
            .map_err(command_error("release"))?;
        Ok(())
    }

    async fn mark_dead(
        &self,
        key: &JobKey,
        reason: DeadReason,
        campaign: Option<&CampaignId>,
    ) -> Result<(), StoreError> {
        let keys = self.keys.dead(key, campaign.map(CampaignId::as_str));
        let _: i64 = self
            .mark_dead
            .keys(&keys)
            .arg(reason.as_str())
            .arg(JOB_RECORD_TTL.as_secs())
            .invoke_async(&mut self.conn())
            .await
            .map_err(command_error("mark_dead"))?;
        Ok(())
    }

    async fn message(&self, waba: &WabaId, wamid: &Wamid) -> Result<Message, StoreError> {
        let fields: std::collections::HashMap<String, String> = self
            .conn()
            .hgetall(self.keys.message_key(waba, wamid))
            .await
            .map_err(command_error("message"))?;
        let record = fields
            .get("record")
            .map(|r| serde_json::from_str(r).map_err(|e| bad_reply("message", e.to_string())))
            .transpose()?;
        Ok(Message {
            record,
            status: fields.get("status").cloned(),
            priced: fields.contains_key("priced"),
        })
    }

    async fn apply_status(
        &self,
        waba: &WabaId,
        wamid: &Wamid,
        expected: Option<&str>,
        status: &str,
        tally: &Tally,
    ) -> Result<bool, StoreError> {
        let campaign = tally.campaign.as_ref().map(CampaignId::as_str);
        let mut script = self.apply_status.keys(&self.keys.status(
            waba,
            wamid,
            tally.report.then_some(campaign),
        ));
        let (category, micros) = tally
            .cost
            .as_ref()
            .map_or(("", 0), |c| (c.category.as_str(), c.micros));
        let applied: i64 = script
            .arg(expected.unwrap_or(""))
            .arg(status)
            .arg(WAMID_TTL.as_secs())
            .arg(category)
            .arg(micros)
            .arg(&tally.reached)
            .invoke_async(&mut self.conn())
            .await
            .map_err(command_error("apply_status"))?;
        Ok(applied == 1)
    }

    async fn report(
        &self,
        waba: &WabaId,
        campaign: Option<&CampaignId>,
    ) -> Result<Report, StoreError> {
        let key = self
            .keys
            .report_keys(waba, campaign.map(CampaignId::as_str))
            .pop()
            .expect("at least the portfolio's");
        let fields: Vec<(String, i64)> = self
            .conn()
            .hgetall(key)
            .await
            .map_err(command_error("report"))?;
        let mut report = Report::default();
        for (field, value) in fields {
            report.add(&field, value);
        }
        Ok(report)
    }

    async fn record_inbound(
        &self,
        waba: &WabaId,
        number: &PhoneNumberId,
        to: &WaId,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let _: i64 = self
            .inbound
            .key(self.keys.window_key(waba, number, to))
            .arg(millis(at))
            .arg(admission::CARE_WINDOW.as_millis() as u64)
            .invoke_async(&mut self.conn())
            .await
            .map_err(command_error("record_inbound"))?;
        Ok(())
    }

    async fn record_opt_ins(
        &self,
        waba: &WabaId,
        opt_ins: &[(WaId, Mark)],
    ) -> Result<(), StoreError> {
        if opt_ins.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (to, mark) in opt_ins {
            pipe.hset_multiple(
                self.keys.consent_key(waba, to),
                &[
                    ("opt_in_at", millis(mark.at).to_string()),
                    ("opt_in_source", mark.source.clone()),
                ],
            )
            .ignore();
        }
        pipe.query_async::<()>(&mut self.conn())
            .await
            .map_err(command_error("record_opt_ins"))
    }

    async fn record_opt_out(
        &self,
        waba: &WabaId,
        to: &WaId,
        mark: Option<Mark>,
    ) -> Result<(), StoreError> {
        let key = self.keys.consent_key(waba, to);
        let mut conn = self.conn();
        let result = match mark {
            Some(mark) => {
                conn.hset_multiple::<_, _, _, ()>(
                    key,
                    &[
                        ("opt_out_at", millis(mark.at).to_string()),
                        ("opt_out_source", mark.source),
                    ],
                )
                .await
            }
            None => conn.hdel(key, &["opt_out_at", "opt_out_source"]).await,
        };
        result.map_err(command_error("record_opt_out"))
    }

    async fn consent(&self, waba: &WabaId, to: &WaId) -> Result<Consent, StoreError> {
        let fields: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(self.keys.consent_key(waba, to))
            .arg(&["opt_in_at", "opt_in_source", "opt_out_at", "opt_out_source"])
            .query_async(&mut self.conn())
            .await
            .map_err(command_error("consent"))?;
        let mark = |at: &Option<String>, source: &Option<String>| -> Result<_, StoreError> {
            at.as_deref()
                .map(|at| {
                    Ok(Mark {
                        at: from_millis("consent", at)?,
                        source: source.clone().unwrap_or_default(),
                    })
                })
                .transpose()
        };
        Ok(Consent {
            opt_in: mark(&fields[0], &fields[1])?,
            opt_out: mark(&fields[2], &fields[3])?,
        })
    }

    async fn set_campaign(
        &self,
        waba: &WabaId,
        campaign: &CampaignId,
        state: CampaignState,
    ) -> Result<(), StoreError> {
        self.conn()
            .hset_multiple::<_, _, _, ()>(
                self.keys.campaign_key(waba, campaign.as_str()),
                &[
                    ("state", state.as_str().to_owned()),
                    ("at", millis(Utc::now()).to_string()),
                ],
            )
            .await
            .map_err(command_error("set_campaign"))
    }

    async fn campaign(
        &self,
        waba: &WabaId,
        campaign: &CampaignId,
    ) -> Result<Option<CampaignState>, StoreError> {
        let state: Option<String> = self
            .conn()
            .hget(self.keys.campaign_key(waba, campaign.as_str()), "state")
            .await
            .map_err(command_error("campaign"))?;
        state
            .map(|s| {
                CampaignState::parse(&s)
                    .ok_or_else(|| bad_reply("campaign", format!("unknown state {s:?}")))
            })
            .transpose()
    }

    async fn put_templates(
        &self,
        waba: &WabaId,
        templates: &[TemplateDefinition],
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let index = self.keys.tagged(waba, format_args!("templates"));
        let old: Vec<String> = self
            .conn()
            .smembers(&index)
            .await
            .map_err(command_error("put_templates"))?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        let member = |t: &TemplateDefinition| format!("{}:{}", t.name, t.language);
        for stale in old
            .iter()
            .filter(|m| !templates.iter().any(|t| member(t) == **m))
        {
            pipe.del(self.keys.tagged(waba, format_args!("tpl:{stale}")))
                .ignore();
        }
        pipe.del(&index).ignore();
        for t in templates {
            let category = t.category().unwrap_or(Category::Marketing);
            pipe.hset_multiple(
                self.keys.template_key(waba, &t.name, &t.language),
                &[
                    ("status", t.status.clone()),
                    ("category", category.as_str().to_owned()),
                    (
                        "def",
                        serde_json::to_string(t).expect("a definition always serialises"),
                    ),
                ],
            )
            .ignore()
            .sadd(&index, member(t))
            .ignore();
        }
        pipe.set(
            self.keys.tagged(waba, format_args!("templates:synced")),
            millis(at),
        )
        .ignore();
        pipe.query_async::<()>(&mut self.conn())
            .await
            .map_err(command_error("put_templates"))
    }

    async fn set_template_status(
        &self,
        waba: &WabaId,
        name: &str,
        language: &str,
        status: &str,
    ) -> Result<(), StoreError> {
        // Only a known template: an unknown one has no category yet and waits for the next sync.
        let _: i64 = self
            .template_status
            .key(self.keys.template_key(waba, name, language))
            .arg(status)
            .invoke_async(&mut self.conn())
            .await
            .map_err(command_error("set_template_status"))?;
        Ok(())
    }

    async fn templates(&self, waba: &WabaId) -> Result<Vec<TemplateDefinition>, StoreError> {
        let members: Vec<String> = self
            .conn()
            .smembers(self.keys.tagged(waba, format_args!("templates")))
            .await
            .map_err(command_error("templates"))?;
        if members.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for m in &members {
            pipe.cmd("HMGET")
                .arg(self.keys.tagged(waba, format_args!("tpl:{m}")))
                .arg(&["def", "status"]);
        }
        let rows: Vec<(Option<String>, Option<String>)> = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(command_error("templates"))?;
        let mut out = Vec::with_capacity(rows.len());
        for (def, status) in rows {
            let Some(def) = def else { continue };
            let mut def: TemplateDefinition =
                serde_json::from_str(&def).map_err(|e| bad_reply("templates", e.to_string()))?;
            if let Some(status) = status {
                def.status = status;
            }
            out.push(def);
        }
        out.sort_by(|a, b| (&a.name, &a.language).cmp(&(&b.name, &b.language)));
        Ok(out)
    }

    async fn set_template_category(
        &self,
        waba: &WabaId,
        name: &str,
        language: &str,
        category: Category,
    ) -> Result<bool, StoreError> {
        const OP: &str = "set_template_category";
        let key = self.keys.template_key(waba, name, language);
        // The definition is read, changed and written back only if no sync replaced it in
        // between (compare and set), so a sync's newer definition is never overwritten.
        loop {
            let read: Option<String> = self
                .conn()
                .hget(&key, "def")
                .await
                .map_err(command_error(OP))?;
            let Some(read) = read else {
                return Ok(false);
            };
            let mut def: TemplateDefinition =
                serde_json::from_str(&read).map_err(|e| bad_reply(OP, e.to_string()))?;
            def.category = category.as_str().to_ascii_uppercase();
            let written = serde_json::to_string(&def).expect("a definition always serialises");
            let set: i64 = self
                .template_category
                .key(&key)
                .arg(&read)
                .arg(category.as_str())
                .arg(written)
                .invoke_async(&mut self.conn())
                .await
                .map_err(command_error(OP))?;
            match set {
                1 => return Ok(true),
                -1 => return Ok(false),
                _ => continue,
            }
        }
    }

    async fn set_tier_limit(&self, waba: &WabaId, limit: Option<u32>) -> Result<(), StoreError> {
        let value = limit.map_or("unlimited".to_owned(), |l| l.to_string());
        self.conn()
            .set::<_, _, ()>(self.keys.tier_limit_key(waba), value)
            .await
            .map_err(command_error("set_tier_limit"))
    }

    async fn tier_limit(&self, waba: &WabaId) -> Result<Option<Option<u32>>, StoreError> {
        let value: Option<String> = self
            .conn()
            .get(self.keys.tier_limit_key(waba))
            .await
            .map_err(command_error("tier_limit"))?;
        value
            .map(|v| match v.as_str() {
                "unlimited" => Ok(None),
                n => n
                    .parse()
                    .map(Some)
                    .map_err(|_| bad_reply("tier_limit", format!("tier limit {v:?}"))),
            })
            .transpose()
    }

    async fn record_display_number(
        &self,
        waba: &WabaId,
        display: &str,
        number: &PhoneNumberId,
    ) -> Result<(), StoreError> {
        self.conn()
            .hset::<_, _, _, ()>(self.keys.displays_key(waba), display, number.as_str())
            .await
            .map_err(command_error("record_display_number"))
    }

    async fn display_numbers(
        &self,
        waba: &WabaId,
    ) -> Result<std::collections::BTreeMap<String, PhoneNumberId>, StoreError> {
        let all: std::collections::HashMap<String, String> = self
            .conn()
            .hgetall(self.keys.displays_key(waba))
            .await
            .map_err(command_error("display_numbers"))?;
        all.into_iter()
            .map(|(display, number)| {
                PhoneNumberId::parse(number)
                    .map(|n| (display, n))
                    .map_err(|e| bad_reply("display_numbers", e.to_string()))
            })
            .collect()
    }

    async fn set_throughput(&self, number: &PhoneNumberId, mps: u32) -> Result<(), StoreError> {
        self.conn()
            .set::<_, _, ()>(self.keys.throughput_key(number), mps)
            .await
            .map_err(command_error("set_throughput"))
    }

    async fn book_slot(
        &self,
        waba: &WabaId,
        number: &PhoneNumberId,
        now: DateTime<Utc>,
        interval: Duration,
    ) -> Result<Duration, StoreError> {
        let wait: String = self
            .book_slot
            .key(self.keys.pace_key(waba, number))
            .arg(now.timestamp_micros())
            .arg(interval.as_micros() as u64)
            .invoke_async(&mut self.conn())
            .await
            .map_err(command_error("book_slot"))?;
        let us = wait
            .parse()
            .map_err(|_| bad_reply("book_slot", format!("wait {wait:?}")))?;
        Ok(Duration::from_micros(us))
    }

    async fn throttled(
        &self,
        waba: &WabaId,
        number: &PhoneNumberId,
        now: DateTime<Utc>,
        cooldown: Duration,
    ) -> Result<(), StoreError> {
        let _: i64 = self
            .throttle
            .key(self.keys.pace_key(waba, number))
            .arg(millis(now))
            .arg(cooldown.as_millis() as u64)
            .invoke_async(&mut self.conn())
            .await
            .map_err(command_error("throttled"))?;
        Ok(())
    }

    async fn heartbeat(&self, beat: &Heartbeat<'_>) -> Result<Live, StoreError> {
        let key = self.keys.replicas_key(beat.group);
        let now = millis(beat.now);
        let ttl = beat.ttl.as_millis() as i64;
        let mut pipe = redis::pipe();
        pipe.zadd(&key, beat.replica, now)
            .ignore()
            .zrembyscore(&key, "-inf", now - ttl)
            .ignore()
            .pexpire(&key, ttl * 10)
            .ignore()
            .zcard(&key);
        for n in beat.numbers {
            pipe.get(self.keys.throughput_key(n));
        }
        let (replicas, throughput): (u32, Vec<Option<u32>>) = {
            let reply: Vec<redis::Value> = pipe
                .query_async(&mut self.conn())
                .await
                .map_err(command_error("heartbeat"))?;
            let parse = |v: &redis::Value| redis::from_redis_value_ref::<Option<u32>>(v);
            let mut values = reply.iter();
            let replicas = values
                .next()
                .and_then(|v| parse(v).ok().flatten())
                .unwrap_or(1);
            let rest = values
                .map(|v| parse(v).map_err(|e| bad_reply("heartbeat", e.to_string())))
                .collect::<Result<_, _>>()?;
            (replicas, rest)
        };
        Ok(Live {
            replicas: replicas.max(1),
            throughput: beat
                .numbers
                .iter()
                .zip(throughput)
                .filter_map(|(n, t)| t.map(|t| (n.clone(), t)))
                .collect(),
        })
    }

    async fn leave(&self, group: &str, replica: &str) -> Result<(), StoreError> {
        self.conn()
            .zrem::<_, _, ()>(self.keys.replicas_key(group), replica)
            .await
            .map_err(command_error("leave"))
    }

    async fn try_lock(&self, name: &str, owner: &str, ttl: Duration) -> Result<bool, StoreError> {
        let taken: Option<String> = redis::cmd("SET")
            .arg(format!("{}:lock:{name}", self.keys.prefix))
            .arg(owner)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async(&mut self.conn())
            .await
            .map_err(command_error("try_lock"))?;
        Ok(taken.is_some())
    }

    async fn unlock(&self, name: &str, owner: &str) -> Result<(), StoreError> {
        let _: i64 = self
            .unlock
            .key(format!("{}:lock:{name}", self.keys.prefix))
            .arg(owner)
            .invoke_async(&mut self.conn())
            .await
            .map_err(command_error("unlock"))?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let _: String = redis::cmd("PING")
            .query_async(&mut self.conn())
            .await
            .map_err(command_error("PING"))?;
        Ok(())
    }

    async fn raise_halt(&self, halt: &Halt) -> Result<(), StoreError> {
        let value = serde_json::to_string(halt).expect("a halt serialises");
        let _: i64 = redis::cmd("HSET")
            .arg(self.keys.halts_key())
            .arg(&halt.scope)
            .arg(value)
            .query_async(&mut self.conn())
            .await
            .map_err(command_error("raise_halt"))?;
        Ok(())
    }

    async fn raise_account_halt(&self, condition: &str, halt: &Halt) -> Result<(), StoreError> {
        let value = serde_json::to_string(halt).expect("a halt serialises");
        let _: i64 = redis::cmd("HSET")
            .arg(self.keys.halts_key())
            .arg(super::account_halt_field(condition, &halt.scope))
            .arg(value)
            .query_async(&mut self.conn())
            .await
            .map_err(command_error("raise_account_halt"))?;
        Ok(())
    }

    async fn lift_account_halt(
        &self,
        condition: &str,
        scope: &HaltScope,
    ) -> Result<bool, StoreError> {
        let removed: i64 = redis::cmd("HDEL")
            .arg(self.keys.halts_key())
            .arg(super::account_halt_field(condition, &scope.to_string()))
            .query_async(&mut self.conn())
            .await
            .map_err(command_error("lift_account_halt"))?;
        Ok(removed > 0)
    }

    async fn halts(&self, now: DateTime<Utc>) -> Result<Vec<Halt>, StoreError> {
        let all: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.keys.halts_key())
            .query_async(&mut self.conn())
            .await
            .map_err(command_error("halts"))?;
        // Ended halts stay in the hash until the next one of their scope replaces them: a few
        // entries at most, so reading past them costs nothing worth a cleanup.
        let recorded = all.iter().filter_map(|(field, v)| {
            let halt = serde_json::from_str::<Halt>(v).ok()?;
            Some((*field != halt.scope, halt))
        });
        Ok(super::in_force(recorded, now))
    }

    async fn lift_halt(&self, scope: &HaltScope) -> Result<bool, StoreError> {
        let removed: i64 = self
            .lift_halts
            .key(self.keys.halts_key())
            .arg(scope.to_string())
            .invoke_async(&mut self.conn())
            .await
            .map_err(command_error("lift_halt"))?;
        Ok(removed > 0)
    }
}

#[cfg(test)]
mod tests {
    use redis::cluster_routing::Slot;

    use super::*;

    /// Asserts that `keys` hash to one Redis Cluster slot (a cluster refuses a script or
    /// pipeline whose keys do not: CROSSSLOT).
    fn one_slot(what: &str, keys: &[String]) {
        let first = Slot::for_key(&keys[0]);
        for key in keys {
            assert_eq!(
                Slot::for_key(key),
                first,
                "{what}: {key} is not in {}'s slot",
                keys[0]
            );
        }
    }

    #[test]
    fn every_script_and_pipeline_keeps_its_keys_in_one_slot() {
        let keys = Keys {
            prefix: "wa".into(),
        };
        let waba = WabaId::parse("102290129340398".to_owned()).unwrap();
        let job = JobKey {
            waba: waba.clone(),
            job_id: crate::ids::JobId::parse("job-1".to_owned()).unwrap(),
        };
        let number = PhoneNumberId::parse("106540352242922".to_owned()).unwrap();
        let wamid = Wamid::parse("wamid.HBgLMTY1MDU1NTEyMzQVAgARGBI".to_owned()).unwrap();
        for (campaign, template) in [(None, None), (Some("spring-sale"), Some("order_update"))] {
            let subject = Subject {
                job: job.clone(),
                number: number.clone(),
                to: WaId::parse("16505551234".to_owned()).unwrap(),
                campaign: campaign.map(|c| CampaignId::parse(c.to_owned()).unwrap()),
                template: template.map(|t| (t.to_owned(), "en_US".to_owned())),
            };
            let mut admission = keys.admission(&subject).to_vec();
            one_slot("admit", &admission);
            // book_and_admit: admission's keys and the number's schedule.
            admission.push(keys.pace_key(&waba, &number));
            one_slot("book_and_admit", &admission);
            one_slot("mark_sent", &keys.sent(&job, &wamid, campaign));
            one_slot("mark_dead", &keys.dead(&job, campaign));
            one_slot("apply_status", &keys.status(&waba, &wamid, Some(campaign)));
        }
        // A heartbeat reads the replicas and every number's throughput in one pipeline.
        let other = PhoneNumberId::parse("106540352242923".to_owned()).unwrap();
        one_slot(
            "heartbeat",
            &[
                keys.replicas_key("wa-sender"),
                keys.throughput_key(&number),
                keys.throughput_key(&other),
            ],
        );
        // The scripts of one key (a template's category, the halts) need no check; the keys the
        // webhook processor writes beside admission's are under the portfolio's tag all the same.
        one_slot(
            "portfolio",
            &[
                keys.tier_limit_key(&waba),
                keys.displays_key(&waba),
                keys.template_key(&waba, "order_update", "en_US"),
            ],
        );
        // Another portfolio's keys live elsewhere: the tag is the portfolio, not the prefix.
        let elsewhere = WabaId::parse("102290129340399".to_owned()).unwrap();
        let spread = [
            keys.tagged(&waba, format_args!("tier")),
            keys.tagged(&elsewhere, format_args!("tier")),
        ];
        assert_ne!(Slot::for_key(&spread[0]), Slot::for_key(&spread[1]));
    }
}
