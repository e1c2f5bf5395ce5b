//! RabbitMQ through lapin: the topology (a queue per business number and lane, the unrouted
//! queue, delay queues, events, dead letters, webhook intake) declared idempotently at connect,
//! publisher confirms on every publish, one consuming channel per number whose acks go out in
//! batches ([`super::acks`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::{Mutex, RwLock};

use super::acks::{Acks, SendAcks};
use super::{
    Acker, Broker, BrokerError, Confirm, Delivery, Envelope, H_DELAY, H_DELAY_LEGACY, HeaderValue,
    Headers, Intake, Route, Stream, Tap, Tapped, Target, Unrouted,
};
use crate::ids::PhoneNumberId;
use crate::job::Lane;
use crate::policy::DelayTiers;

/// Whether lane and intake queues are quorum (production) or classic (fast to create in tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueType {
    /// Raft-replicated, survives a node loss.
    Quorum,
    /// Single-node; for tests.
    Classic,
}

/// How to reach and lay out RabbitMQ.
#[derive(Debug, Clone)]
pub struct RabbitSettings {
    /// The broker's nodes, `amqp://user:pass@host:port/vhost` each (at least one).
    pub urls: Vec<String>,
    /// How many nodes hold a new quorum queue (`x-quorum-initial-group-size`; unset: all).
    pub quorum_group_size: Option<u32>,
    /// Name prefix of every exchange and queue (`wa` → `wa.send`, `wa.dead`, …).
    pub prefix: String,
    /// Queue type for lanes and intake.
    pub queue_type: QueueType,
    /// Delay-queue tiers.
    pub delay_tiers: DelayTiers,
    /// Quorum queues' `x-delivery-limit`: a poison message's second safety net.
    pub delivery_limit: u32,
    /// The business numbers whose lane queues to declare (each gets one queue per lane).
    pub numbers: Vec<PhoneNumberId>,
    /// The most events `wa.events.kept` holds unread (`x-max-length`); past it the oldest go.
    /// 0: no such queue.
    pub events_kept: u64,
}

/// Every name in the topology, derived from one prefix.
#[derive(Debug, Clone)]
pub struct Names {
    prefix: String,
}

impl Names {
    /// Names under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Names {
            prefix: prefix.to_owned(),
        }
    }
    /// `wa.send` (direct, routing key `<lane>.<phone_number_id>`).
    pub fn send_exchange(&self) -> String {
        format!("{}.send", self.prefix)
    }
    /// `wa.send.<phone_number_id>.<lane>`: one business number's lane.
    pub fn number_queue(&self, number: &str, lane: Lane) -> String {
        format!("{}.send.{number}.{}", self.prefix, lane.as_str())
    }
    /// `wa.send.unrouted`: `wa.send`'s alternate exchange (fanout) and its queue.
    pub fn unrouted(&self) -> String {
        format!("{}.send.unrouted", self.prefix)
    }
    /// `wa.delay` (headers: `wa-delay` names the tier; the routing key is the job's own).
    pub fn delay_exchange(&self) -> String {
        format!("{}.delay", self.prefix)
    }
    /// `wa.delay.<tier>`.
    pub fn delay_queue(&self, tier: Duration) -> String {
        format!("{}.delay.{}", self.prefix, DelayTiers::name(tier))
    }
    /// `wa.dead` (topic).
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.prefix)
    }
    /// `wa.dead.all`.
    pub fn dead_queue(&self) -> String {
        format!("{}.dead.all", self.prefix)
    }
    /// `wa.events` (topic).
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }
    /// `wa.events.kept`: the queue that keeps every event published to `wa.events` until it
    /// is read.
    pub fn events_kept(&self) -> String {
        format!("{}.events.kept", self.prefix)
    }
    /// `wa.webhooks.intake`.
    pub fn intake_queue(&self) -> String {
        format!("{}.webhooks.intake", self.prefix)
    }
    /// `wa.webhooks.parked`.
    pub fn parked_queue(&self) -> String {
        format!("{}.webhooks.parked", self.prefix)
    }
}

/// The exchanges and queues of one prefix, by name.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Topology {
    /// `wa.send`, its alternate exchange, `wa.delay`, `wa.dead`, `wa.events`.
    pub exchanges: Vec<String>,
    /// A queue per configured number and lane, the unrouted queue, the delay queues, the dead
    /// queue, the webhook intake and the parked webhooks.
    pub queues: Vec<String>,
}

/// A connected RabbitMQ broker. When the connection is lost (a broker restart, a network cut),
/// the failing publish is reported (the receiver answers 503, a worker returns its job) and
/// the next use after [`RECONNECT_PAUSE`] opens a new connection and declares the topology
/// again; consumers consume again through [`Broker::consume_intake`] / [`Broker::consume`].
pub struct RabbitBroker {
    link: RwLock<Link>,
    /// When a reconnection was last tried (one at a time, one per pause).
    reconnected: Mutex<Option<Instant>>,
    /// Closed on purpose ([`RabbitBroker::close`]): never reconnected.
    closed: AtomicBool,
    names: Names,
    settings: RabbitSettings,
    consumers: Mutex<Vec<(Channel, ShortString)>>,
}

/// One connection and its publishing channel (confirm mode).
struct Link {
    connection: Arc<Connection>,
    publisher: Publisher,
    /// Which of the broker's nodes it is connected to (an index into `urls`).
    node: usize,
}

/// The delivery limit of the dead-letter and parked queues: no operator lists a letter this
/// often (see [`RabbitBroker::kept_args`]).
const KEPT_DELIVERY_LIMIT: i64 = 1_000_000;

/// How long connecting to one node may take before the next one is tried (a node that is
/// gone behind a firewall would otherwise hold the connection attempt for minutes).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The channel everything is published on (confirm mode), and whether the broker has nacked a
/// publish on it. A nacked channel is replaced by a new one (at most one per
/// [`RECONNECT_PAUSE`]): RabbitMQ 3.10 has been seen, after losing a node, to nack every later
/// publish of one channel for as long as it lived, while a new channel's publishes went through.
#[derive(Clone)]
struct Publisher {
    channel: Channel,
    nacked: Arc<AtomicBool>,
}

impl Publisher {
    /// Whether it can be published on: open, and nothing nacked on it.
    fn usable(&self) -> bool {
        self.channel.status().connected() && !self.nacked.load(Ordering::Relaxed)
    }
}

/// A channel on `connection` in confirm mode, to publish on.
async fn open_publisher(connection: &Connection) -> Result<Publisher, String> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| format!("open channel: {e}"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| format!("confirm.select: {e}"))?;
    Ok(Publisher {
        channel,
        nacked: Arc::default(),
    })
}

/// The order in which to try `count` nodes: shuffled, so replicas spread over a cluster, with
/// `lost` (the node just lost, if any) last.
fn node_order(count: usize, lost: Option<usize>) -> Vec<usize> {
    use rand::seq::SliceRandom;
    let mut order: Vec<usize> = (0..count).filter(|n| Some(*n) != lost).collect();
    order.shuffle(&mut rand::rng());
    order.extend(lost.filter(|n| *n < count));
    order
}

/// At most one reconnection attempt per this long, so a broker that is down is not hammered
/// (each request in the meantime fails fast).
pub const RECONNECT_PAUSE: Duration = Duration::from_millis(500);

/// The `host:port` of an AMQP URL (what the `wa_broker_node` metric names a node by).
fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, rest)| rest);
    rest.split('/').next().unwrap_or(rest).to_owned()
}

/// `url` without its credentials (for logs and errors).
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in pairs {
        table.insert((*k).into(), v.clone());
    }
    table
}

fn long_string(s: impl Into<String>) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.into()))
}

impl RabbitBroker {
    /// Connects and declares the whole topology (idempotent: safe on every start of every replica).
    pub async fn connect(settings: RabbitSettings) -> Result<Self, BrokerError> {
        let broker = RabbitBroker {
            link: RwLock::new(Self::open(&settings, None).await?),
            reconnected: Mutex::new(None),
            closed: AtomicBool::new(false),
            names: Names::new(&settings.prefix),
            settings,
            consumers: Mutex::new(Vec::new()),
        };
        broker.declare().await?;
        Ok(broker)
    }

    /// Connects to one of the broker's nodes, trying them in [`node_order`].
    async fn open(settings: &RabbitSettings, lost: Option<usize>) -> Result<Link, BrokerError> {
        let (mut failures, mut refused) = (Vec::new(), false);
        for node in node_order(settings.urls.len(), lost) {
            let url = &settings.urls[node];
            match Self::open_node(url).await {
                Ok((connection, publisher)) => {
                    if settings.urls.len() > 1 {
                        tracing::info!(node = %redact(url), "connected to RabbitMQ");
                    }
                    let left = lost.map(|l| host_port(&settings.urls[l]));
                    crate::metrics::broker_node(left.as_deref(), &host_port(url));
                    return Ok(Link {
                        connection: Arc::new(connection),
                        publisher,
                        node,
                    });
                }
                Err((e, refusal)) => {
                    refused |= refusal;
                    failures.push(format!("{}: {e}", redact(url)));
                }
            }
        }
        let urls: Vec<String> = settings.urls.iter().map(|u| redact(u)).collect();
        let url = urls.join(", ");
        let detail = failures.join("; ").trim_end_matches('.').to_owned();
        Err(if refused {
            BrokerError::Refused { url, detail }
        } else {
            BrokerError::Unreachable { url, detail }
        })
    }

    /// A connection to the node at `url` and its publishing channel, in confirm mode; or why
    /// not, and whether the broker refused the login or virtual host (a node that answers).
    async fn open_node(url: &str) -> Result<(Connection, Publisher), (String, bool)> {
        let connecting = Connection::connect(url, ConnectionProperties::default());
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| (format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()), false))?
            .map_err(|e| {
                let refused = matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp)
                    if matches!(amqp.kind(),
                        lapin::protocol::AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::ACCESSREFUSED)
                        | lapin::protocol::AMQPErrorKind::Hard(lapin::protocol::AMQPHardError::NOTALLOWED)));
                (e.to_string(), refused)
            })?;
        let publisher = open_publisher(&connection).await.map_err(|e| (e, false))?;
        Ok((connection, publisher))
    }

    /// Opens a new connection if the current one is gone (and none was tried in the last
    /// [`RECONNECT_PAUSE`]), and declares the topology on it, in case the broker lost it.
    async fn heal(&self) {
        if self.closed.load(Ordering::Relaxed) || self.healthy().await {
            return;
        }
        let mut last = self.reconnected.lock().await;
        if self.healthy().await || last.is_some_and(|at| at.elapsed() < RECONNECT_PAUSE) {
            return;
        }
        *last = Some(Instant::now());
        let (connection, lost) = {
            let link = self.link.read().await;
            (Arc::clone(&link.connection), link.node)
        };
        if connection.status().connected() {
            // The connection lives, its publishing channel is closed (the broker closed it: a
            // refused declare, an unknown queue) or nacked a publish: a new one on the same
            // connection. The old one closes once its last publish is answered.
            match open_publisher(&connection).await {
                Ok(publisher) => {
                    let old = std::mem::replace(&mut self.link.write().await.publisher, publisher);
                    let why = if old.nacked.load(Ordering::Relaxed) {
                        "a publish was nacked"
                    } else {
                        "the channel was closed"
                    };
                    let (old, new) = (old.channel.id(), self.publishing_channel().await);
                    tracing::info!(why, old, new, "opened a new publishing channel");
                }
                Err(e) => tracing::warn!(error = %e, "could not open a new publishing channel"),
            }
            return;
        }
        match Self::open(&self.settings, Some(lost)).await {
            Ok(link) => {
                *self.link.write().await = link;
                match self.declare().await {
                    Ok(()) => tracing::info!("reconnected to RabbitMQ"),
                    Err(e) => {
                        tracing::warn!(error = %e, "reconnected to RabbitMQ, but declaring the topology failed")
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "RabbitMQ is still unreachable"),
        }
    }

    /// Whether the connection and its publishing channel are both open.
    async fn healthy(&self) -> bool {
        let link = self.link.read().await;
        link.connection.status().connected() && link.publisher.usable()
    }

    /// A new channel on the current connection (healed first if it was lost).
    async fn channel(&self) -> Result<Channel, BrokerError> {
        self.heal().await;
        let connection = self.link.read().await.connection.clone();
        connection
            .create_channel()
            .await
            .map_err(|e| BrokerError::op("open channel", e))
    }

    /// The current publishing channel.
    async fn publisher(&self) -> Publisher {
        self.link.read().await.publisher.clone()
    }

    /// The id of the channel publishes go out on now: a new one after a nack or a close.
    pub async fn publishing_channel(&self) -> u16 {
        self.link.read().await.publisher.channel.id()
    }

    /// The node this broker is connected to now, without credentials.
    pub async fn node(&self) -> String {
        redact(&self.settings.urls[self.link.read().await.node])
    }

    /// The topology's names.
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// A queue consumers take from (a number's lane, the unrouted queue, the webhook intake):
    /// quorum queues count how often a message was returned unsettled and, past the delivery
    /// limit, dead-letter it to `dead_letter` (exchange, routing key).
    ///
    /// CORRECTNESS: without a dead-letter exchange, a quorum queue drops a message past its
    /// delivery limit without a trace. With one, at-least-once: the broker keeps the message
    /// until the dead-letter queue has confirmed it (which needs `reject-publish` overflow;
    /// these queues have no length limit, so it refuses nothing).
    fn queue_args(&self, dead_letter: (String, &str)) -> Vec<(&'static str, AMQPValue)> {
        match self.settings.queue_type {
            QueueType::Quorum => {
                let mut pairs = vec![
                    ("x-queue-type", long_string("quorum")),
                    (
                        "x-delivery-limit",
                        AMQPValue::LongLongInt(i64::from(self.settings.delivery_limit)),
                    ),
                    ("x-dead-letter-exchange", long_string(dead_letter.0)),
                    ("x-dead-letter-routing-key", long_string(dead_letter.1)),
                    ("x-dead-letter-strategy", long_string("at-least-once")),
                    ("x-overflow", long_string("reject-publish")),
                ];
                pairs.extend(self.group_size());
                pairs
            }
            QueueType::Classic => vec![("x-queue-type", long_string("classic"))],
        }
    }

    /// `x-quorum-initial-group-size`, when configured.
    fn group_size(&self) -> Option<(&'static str, AMQPValue)> {
        let size = self.settings.quorum_group_size?;
        Some((
            "x-quorum-initial-group-size",
            AMQPValue::LongLongInt(i64::from(size)),
        ))
    }

    /// A queue that keeps what nobody consumes automatically (dead letters, parked webhooks):
    /// the configured type.
    ///
    /// CORRECTNESS: operators read these queues by taking messages and giving them back (the
    /// channel closes), which a quorum queue counts as a return; RabbitMQ 4 gives every quorum
    /// queue a delivery limit of 20, so without a limit of its own a letter listed twenty times
    /// would be dropped. (`-1`, "no limit" in RabbitMQ 4, drops a message at its first return
    /// in 3.10.)
    fn kept_args(&self) -> Vec<(&'static str, AMQPValue)> {
        match self.settings.queue_type {
            QueueType::Quorum => {
                let mut pairs = vec![
                    ("x-queue-type", long_string("quorum")),
                    (
                        "x-delivery-limit",
                        AMQPValue::LongLongInt(KEPT_DELIVERY_LIMIT),
                    ),
                ];
                pairs.extend(self.group_size());
                pairs
            }
            QueueType::Classic => vec![("x-queue-type", long_string("classic"))],
        }
    }

    /// Messages ready in each of `queues` (passive declares). Asked on a channel of its own: a
    /// queue that cannot answer (its node is down) closes the channel it was asked on.
    async fn message_counts(
        &self,
        queues: impl IntoIterator<Item = String>,
    ) -> Result<Vec<u32>, BrokerError> {
        let options = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let channel = self.channel().await?;
        let counts = queues.into_iter().map(|queue| {
            let channel = channel.clone();
            async move {
                channel
                    .queue_declare(queue.into(), options, FieldTable::default())
                    .await
                    .map(|q| q.message_count())
                    .map_err(|e| BrokerError::op("queue.declare", e))
            }
        });
        let counts = futures::future::try_join_all(counts).await;
        if channel.status().connected() {
            let _ = channel.close(200, "depth read".into()).await;
        }
        counts
    }

    /// Whether events are kept in `wa.events.kept` (`amqp.events_kept` above 0).
    fn keeps_events(&self) -> bool {
        self.settings.events_kept > 0
    }

    /// The kept events: the configured type like the jobs (quorum: on every node), bounded in
    /// length, the oldest dropped past it (`drop-head`: refusing new events instead would stop
    /// every send while nobody reads them), and a delivery limit like the other kept queues.
    fn events_kept_args(&self) -> FieldTable {
        let mut pairs = self.kept_args();
        pairs.extend([
            (
                "x-max-length",
                AMQPValue::LongLongInt(
                    i64::try_from(self.settings.events_kept).unwrap_or(i64::MAX),
                ),
            ),
            ("x-overflow", long_string("drop-head")),
        ]);
        args(&pairs)
    }

    /// Where a job past its delivery limit goes: `wa.dead`, reason `delivery_limit`.
    fn job_dead_letter(&self) -> (String, &'static str) {
        (
            self.names.dead_exchange(),
            crate::event::DeadReason::DeliveryLimit.as_str(),
        )
    }

    /// A delay queue: a fixed TTL (messages expire in order, so none blocks another at the
    /// head), then dead-lettered back to `wa.send` under the job's own routing key.
    ///
    /// CORRECTNESS: with quorum queues the delay queues are quorum too, dead-lettering
    /// at-least-once (which needs `reject-publish` overflow): the broker keeps an expired job
    /// until its lane queue has confirmed it, so a broker restart mid-move cannot lose it, as
    /// classic-to-quorum dead-lettering (at-most-once) did. A job may then arrive twice; the
    /// idempotency claim makes that harmless.
    fn delay_args(&self, tier: Duration) -> FieldTable {
        let ttl = i64::try_from(tier.as_millis()).unwrap_or(i64::MAX);
        let mut pairs = vec![
            ("x-message-ttl", AMQPValue::LongLongInt(ttl)),
            (
                "x-dead-letter-exchange",
                long_string(self.names.send_exchange()),
            ),
        ];
        match self.settings.queue_type {
            QueueType::Quorum => {
                pairs.extend([
                    ("x-queue-type", long_string("quorum")),
                    ("x-dead-letter-strategy", long_string("at-least-once")),
                    ("x-overflow", long_string("reject-publish")),
                ]);
                pairs.extend(self.group_size());
            }
            QueueType::Classic => pairs.push(("x-queue-type", long_string("classic"))),
        }
        args(&pairs)
    }

    /// Declares the topology on a channel of its own: a refused declaration closes the channel
    /// it was made on, and that must not be the publishing channel.
    async fn declare(&self) -> Result<(), BrokerError> {
        let connection = Arc::clone(&self.link.read().await.connection);
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| BrokerError::op("open channel", e))?;
        let declared = self.declare_on(&channel).await;
        if channel.status().connected() {
            let _ = channel.close(200, "topology declared".into()).await;
        }
        declared
    }

    async fn declare_on(&self, ch: &Channel) -> Result<(), BrokerError> {
        let n = &self.names;
        let durable_exchange = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let durable_queue = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let exchange = |name: String, kind: ExchangeKind, arguments: FieldTable| async move {
            ch.exchange_declare(name.clone().into(), kind, durable_exchange, arguments)
                .await
                .map_err(|e| BrokerError::op("exchange.declare", format!("{name}: {e}")))
        };
        let queue = |name: String, arguments: FieldTable| async move {
            ch.queue_declare(name.clone().into(), durable_queue, arguments)
                .await
                .map_err(|e| BrokerError::op("queue.declare", declare_failed(&name, &e)))
        };
        let bind = |q: String, x: String, key: String, arguments: FieldTable| async move {
            ch.queue_bind(
                q.clone().into(),
                x.into(),
                key.into(),
                QueueBindOptions::default(),
                arguments,
            )
            .await
            .map_err(|e| BrokerError::op("queue.bind", format!("{q}: {e}")))
        };

        // A job whose key no number's queue is bound to is kept, not dropped: the alternate
        // exchange hands it to the unrouted queue, where the worker re-routes or dead-letters it.
        exchange(n.unrouted(), ExchangeKind::Fanout, FieldTable::default()).await?;
        exchange(
            n.send_exchange(),
            ExchangeKind::Direct,
            args(&[("alternate-exchange", long_string(n.unrouted()))]),
        )
        .await?;
        exchange(
            n.delay_exchange(),
            ExchangeKind::Headers,
            FieldTable::default(),
        )
        .await?;
        exchange(
            n.dead_exchange(),
            ExchangeKind::Topic,
            FieldTable::default(),
        )
        .await?;
        exchange(
            n.events_exchange(),
            ExchangeKind::Topic,
            FieldTable::default(),
        )
        .await?;
        // Events kept whoever listens (when configured): bound before anything is published, so
        // a consumer that comes later reads what came before.
        if self.keeps_events() {
            queue(n.events_kept(), self.events_kept_args()).await?;
            bind(
                n.events_kept(),
                n.events_exchange(),
                "#".into(),
                FieldTable::default(),
            )
            .await?;
        }
        queue(n.unrouted(), args(&self.queue_args(self.job_dead_letter()))).await?;
        bind(
            n.unrouted(),
            n.unrouted(),
            String::new(),
            FieldTable::default(),
        )
        .await?;
        // One queue per number and lane (declared one at a time: 1,500 take about 5 s the first
        // time, under a second when they exist). Each quorum queue holds open files on the
        // broker: hundreds of them need the broker's open-file limit raised (README).
        for number in &self.settings.numbers {
            for lane in Lane::ALL {
                let name = n.number_queue(number.as_str(), lane);
                queue(name.clone(), args(&self.queue_args(self.job_dead_letter()))).await?;
                let key = super::Route::new(lane, number.as_str()).routing_key();
                bind(name, n.send_exchange(), key, FieldTable::default()).await?;
            }
        }
        for &tier in self.settings.delay_tiers.all() {
            queue(n.delay_queue(tier), self.delay_args(tier)).await?;
            let on_tier = args(&[
                ("x-match", long_string("all")),
                (H_DELAY, long_string(DelayTiers::name(tier))),
            ]);
            bind(
                n.delay_queue(tier),
                n.delay_exchange(),
                String::new(),
                on_tier,
            )
            .await?;
            // The binding of earlier versions matched every message (see H_DELAY_LEGACY).
            let legacy = args(&[
                ("x-match", long_string("all")),
                (H_DELAY_LEGACY, long_string(DelayTiers::name(tier))),
            ]);
            ch.queue_unbind(
                n.delay_queue(tier).into(),
                n.delay_exchange().into(),
                "".into(),
                legacy,
            )
            .await
            .map_err(|e| BrokerError::op("queue.unbind", e))?;
        }
        // Dead letters and parked webhooks are kept on every node like the jobs (quorum): a
        // classic queue lives on one node, and while that node is down nothing can be
        // dead-lettered or parked.
        queue(n.dead_queue(), args(&self.kept_args())).await?;
        bind(
            n.dead_queue(),
            n.dead_exchange(),
            "#".into(),
            FieldTable::default(),
        )
        .await?;
        // A webhook body past its delivery limit is parked, through the default exchange (which
        // routes by queue name and always exists). The parked queue is declared first.
        queue(n.parked_queue(), args(&self.kept_args())).await?;
        let parked = n.parked_queue();
        queue(
            n.intake_queue(),
            args(&self.queue_args((String::new(), &parked))),
        )
        .await?;
        Ok(())
    }

    /// Every exchange and queue [`RabbitBroker::connect`] declares under this prefix and these
    /// numbers (`wa-sender setup` prints them; tests delete them).
    pub fn topology(&self) -> Topology {
        let n = &self.names;
        let mut queues: Vec<String> = self
            .settings
            .numbers
            .iter()
            .flat_map(|number| Lane::ALL.map(|lane| n.number_queue(number.as_str(), lane)))
            .collect();
        queues.push(n.unrouted());
        queues.extend(
            self.settings
                .delay_tiers
                .all()
                .iter()
                .map(|t| n.delay_queue(*t)),
        );
        queues.extend([n.dead_queue(), n.intake_queue(), n.parked_queue()]);
        if self.keeps_events() {
            queues.push(n.events_kept());
        }
        Topology {
            exchanges: vec![
                n.send_exchange(),
                n.unrouted(),
                n.delay_exchange(),
                n.dead_exchange(),
                n.events_exchange(),
            ],
            queues,
        }
    }

    /// Deletes every queue and exchange of this prefix (tests clean up after themselves).
    pub async fn delete_topology(&self) -> Result<(), BrokerError> {
        let ch = self.channel().await?;
        let Topology { exchanges, queues } = self.topology();
        for q in queues {
            ch.queue_delete(q.into(), QueueDeleteOptions::default())
                .await
                .map_err(|e| BrokerError::op("queue.delete", e))?;
        }
        for x in exchanges {
            ch.exchange_delete(x.into(), ExchangeDeleteOptions::default())
                .await
                .map_err(|e| BrokerError::op("exchange.delete", e))?;
        }
        // Closed here, not on drop: a close still queued would race a connection closed next.
        let _ = ch.close(200, "topology deleted".into()).await;
        Ok(())
    }

    /// Closes the connection for good (in-flight acks are flushed first by the broker protocol).
    pub async fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        // The consumers' channels first, each answered: a channel close still in flight (its
        // stream just dropped) answered after the connection closed names a channel lapin has
        // forgotten, and lapin logs that as a connection error.
        let consumers = std::mem::take(&mut *self.consumers.lock().await);
        futures::future::join_all(
            consumers
                .into_iter()
                .map(|(channel, _)| close_answered(channel)),
        )
        .await;
        let connection = self.link.read().await.connection.clone();
        let _ = connection.close(200, "bye".into()).await;
    }

    /// Takes up to `max` messages off the dead queue without acking them, in queue order, so an
    /// operator can read them and remove some ([`HeldLetter::remove`]). Every message not
    /// removed goes back to the dead queue, in its place, when the [`HeldDead`] is released or
    /// dropped. While they are held, nobody else sees them: a second listing at the same
    /// moment finds the dead queue shorter.
    pub async fn hold_dead(&self, max: usize) -> Result<HeldDead, BrokerError> {
        let channel = self.channel().await?;
        let guard = ChannelGuard(channel.clone());
        let mut letters = Vec::new();
        while letters.len() < max {
            let got = channel
                .basic_get(
                    self.names.dead_queue().into(),
                    BasicGetOptions { no_ack: false },
                )
                .await
                .map_err(|e| BrokerError::op("basic.get", e))?;
            let Some(got) = got else { break };
            let d = got.delivery;
            letters.push(HeldLetter {
                reason: d.routing_key.as_str().to_owned(),
                envelope: Envelope {
                    body: d.data.into(),
                    headers: from_properties(&d.properties),
                },
                acker: d.acker,
            });
        }
        Ok(HeldDead { guard, letters })
    }

    /// Consumes each of `queues` on one new channel, each consumer with at most `prefetch`
    /// unacked deliveries (per-consumer QoS); a delivery's origin is made from its routing key.
    async fn consume_queues<Q: Send + 'static>(
        &self,
        queues: Vec<(String, Origin<Q>)>,
        prefetch: u16,
    ) -> Result<Vec<Stream<Delivery<Q>>>, BrokerError> {
        let channel = self.channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await
            .map_err(|e| BrokerError::op("basic.qos", e))?;
        // Dropping every stream of the channel (a consumer that gives up after an error) closes
        // it, so the deliveries it held go back to their queues at once instead of staying unacked.
        let guard = Arc::new(ChannelGuard(channel.clone()));
        let acks = Arc::new(Acks::default());
        let sender = Arc::new(ChannelAcks(channel.clone()));
        let mut streams = Vec::with_capacity(queues.len());
        for (queue, origin) in queues {
            let tag: ShortString =
                format!("wa-sender-{queue}-{}", uuid::Uuid::new_v4().simple()).into();
            let consumer = channel
                .basic_consume(
                    queue.into(),
                    tag.clone(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| BrokerError::op("basic.consume", e))?;
            self.consumers.lock().await.push((channel.clone(), tag));
            let (guard, acks, sender) = (Arc::clone(&guard), Arc::clone(&acks), sender.clone());
            streams.push(
                consumer
                    .map(move |d| {
                        let _ = &guard;
                        let d = d.map_err(|e| BrokerError::op("consume", e))?;
                        let published_at = d
                            .properties
                            .timestamp()
                            .and_then(|s| chrono::DateTime::from_timestamp(s as i64, 0));
                        let envelope = Envelope {
                            body: d.data.into(),
                            headers: from_properties(&d.properties),
                        };
                        Ok(Delivery::new(
                            origin(d.routing_key.as_str()),
                            envelope,
                            d.redelivered,
                            Box::new(LapinAcker {
                                acker: d.acker,
                                tag: d.delivery_tag,
                                acks: Arc::clone(&acks),
                                sender: sender.clone(),
                            }),
                        )
                        .published_at(published_at))
                    })
                    .boxed(),
            );
        }
        Ok(streams)
    }

    /// Sends one publish on the confirm channel and returns its pending confirm: the frame is
    /// on its way, the broker's answer is not in yet. `message_id` becomes the AMQP message id.
    async fn start_publish(
        &self,
        target: &Target,
        envelope: &Envelope,
        message_id: Option<&str>,
    ) -> Result<Confirm, BrokerError> {
        let (exchange, key) = self.route(target);
        let mut headers = to_table(&envelope.headers);
        if let Target::Delay { tier, .. } = target {
            headers.insert(H_DELAY.into(), long_string(DelayTiers::name(*tier)));
        }
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            // What a consumer measures a job's wait from (AMQP keeps seconds).
            .with_timestamp(chrono::Utc::now().timestamp().max(0) as u64)
            .with_headers(headers);
        if let Some(id) = message_id {
            properties = properties.with_message_id(id.into());
        }
        self.heal().await;
        // mandatory: an unroutable job, delay or dead letter comes back instead of vanishing, and
        // so does an event when the kept events' queue is bound to `wa.events`. Without it,
        // events are pub/sub: with no subscriber bound there is nobody to tell, and refusing
        // them would hold every job and webhook hostage to a missing consumer.
        let mandatory = !matches!(target, Target::Event(_)) || self.keeps_events();
        let publisher = self.publisher().await;
        let pending = publisher
            .channel
            .basic_publish(
                exchange.as_str().into(),
                key.as_str().into(),
                BasicPublishOptions {
                    mandatory,
                    ..Default::default()
                },
                &envelope.body,
                properties,
            )
            .await
            .map_err(|e| BrokerError::op("basic.publish", e))?;
        Ok(Box::pin(async move {
            let confirm = pending
                .await
                .map_err(|e| BrokerError::op("publisher confirm", e))?;
            if !confirm.is_ack() {
                publisher.nacked.store(true, Ordering::Relaxed);
                return Err(BrokerError::Nacked(format!("{exchange}/{key}")));
            }
            if confirm.take_message().is_some() {
                return Err(BrokerError::Unroutable(format!("{exchange}/{key}")));
            }
            Ok(())
        }))
    }

    fn route(&self, target: &Target) -> (String, String) {
        let n = &self.names;
        match target {
            Target::Job(route) => (n.send_exchange(), route.routing_key()),
            Target::Delay { route, .. } => (n.delay_exchange(), route.routing_key()),
            Target::Event(key) => (n.events_exchange(), key.clone()),
            Target::Dead(reason) => (n.dead_exchange(), reason.as_str().to_owned()),
            // The default exchange routes by queue name.
            Target::Intake => (String::new(), n.intake_queue()),
            Target::Parked => (String::new(), n.parked_queue()),
        }
    }
}

/// Why declaring `queue` failed, with what to do when it exists with other arguments.
fn declare_failed(queue: &str, e: &lapin::Error) -> String {
    let e = e.to_string();
    if !e.contains("inequivalent arg") {
        return format!("{queue}: {e}");
    }
    format!(
        "{queue} exists with other arguments than this configuration declares ({e}). It was \
         declared by another configuration (amqp.queue_type, amqp.delivery_limit, amqp.events_kept) or an earlier \
         version: use the same settings, or move its messages elsewhere and delete it \
         (rabbitmqctl delete_queue {queue}) so that it is declared again"
    )
}

fn to_table(headers: &Headers) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in &headers.0 {
        let value = match v {
            HeaderValue::Str(s) => long_string(s.clone()),
            HeaderValue::Int(i) => AMQPValue::LongLongInt(*i),
        };
        table.insert(k.as_str().into(), value);
    }
    table
}

fn from_properties(properties: &BasicProperties) -> Headers {
    let mut headers = Headers::default();
    let Some(table) = properties.headers() else {
        return headers;
    };
    for (k, v) in table {
        let value = match v {
            AMQPValue::LongString(s) => {
                HeaderValue::Str(String::from_utf8_lossy(s.as_bytes()).into_owned())
            }
            AMQPValue::ShortString(s) => HeaderValue::Str(s.as_str().to_owned()),
            AMQPValue::LongLongInt(i) => HeaderValue::Int(*i),
            AMQPValue::LongInt(i) => HeaderValue::Int(i64::from(*i)),
            AMQPValue::LongUInt(i) => HeaderValue::Int(i64::from(*i)),
            AMQPValue::ShortInt(i) => HeaderValue::Int(i64::from(*i)),
            AMQPValue::ShortUInt(i) => HeaderValue::Int(i64::from(*i)),
            AMQPValue::ShortShortInt(i) => HeaderValue::Int(i64::from(*i)),
            AMQPValue::ShortShortUInt(i) => HeaderValue::Int(i64::from(*i)),
            // x-death and other broker-added structures are not ours to interpret.
            _ => continue,
        };
        headers.0.insert(k.as_str().to_owned(), value);
    }
    headers
}

/// Dead letters taken off the dead queue and not yet acked ([`RabbitBroker::hold_dead`]).
pub struct HeldDead {
    /// Closes the channel when dropped, which returns every letter not removed to the queue.
    guard: ChannelGuard,
    /// The letters, in queue order.
    pub letters: Vec<HeldLetter>,
}

impl HeldDead {
    /// Returns every letter not removed to the dead queue now (dropping does it too, in the
    /// background).
    pub async fn release(self) {
        let channel = &self.guard.0;
        if channel.status().connected() {
            let _ = channel.close(200, "dead letters released".into()).await;
        }
    }
}

/// One held dead letter.
pub struct HeldLetter {
    /// Its routing key on `wa.dead`: the reason.
    pub reason: String,
    /// Body and headers.
    pub envelope: Envelope,
    acker: lapin::Acker,
}

impl HeldLetter {
    /// Removes it from the dead queue for good.
    pub async fn remove(&self) -> Result<(), BrokerError> {
        self.acker
            .ack(BasicAckOptions::default())
            .await
            .map(|_| ())
            .map_err(|e| BrokerError::op("basic.ack", e))
    }
}

/// Makes a delivery's origin from its routing key.
type Origin<Q> = Box<dyn Fn(&str) -> Q + Send + Sync>;

/// How long closing waits for a channel whose close was already sent (by a dropped consumer).
const CLOSE_ANSWER: Duration = Duration::from_secs(1);

/// Closes `channel` and waits for the broker's answer; a channel already closing is waited for
/// up to [`CLOSE_ANSWER`].
async fn close_answered(channel: Channel) {
    if channel.status().connected() {
        let _ = channel.close(200, "bye".into()).await;
    }
    let waited = Instant::now();
    while channel.status().closing() && waited.elapsed() < CLOSE_ANSWER {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Closes a consumer's channel when its streams are dropped.
struct ChannelGuard(Channel);

impl Drop for ChannelGuard {
    fn drop(&mut self) {
        let channel = self.0.clone();
        if channel.status().connected()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                let _ = channel.close(200, "consumer stopped".into()).await;
            });
        }
    }
}

/// How long writing an ack or a reject may take. On a live connection it is written at once;
/// on a connection that died, lapin can leave the write pending for ever, while the broker has
/// already returned every unacked delivery of the channel: giving up then loses nothing.
const SETTLE_WRITE: Duration = Duration::from_secs(5);

/// Writes an ack or a reject on `channel`, or says why it could not (a closed channel fails at
/// once, a write that does not end within [`SETTLE_WRITE`] fails then).
async fn write_settlement<T>(
    channel: &Channel,
    operation: &'static str,
    write: impl std::future::Future<Output = lapin::Result<T>>,
) -> Result<(), BrokerError> {
    if !channel.status().connected() {
        return Err(BrokerError::op(
            operation,
            "the channel is closed (the broker returned its unacked deliveries)",
        ));
    }
    match tokio::time::timeout(SETTLE_WRITE, write).await {
        Ok(written) => written
            .map(|_| ())
            .map_err(|e| BrokerError::op(operation, e)),
        Err(_) => Err(BrokerError::op(
            operation,
            format!(
                "not written within {}s: the connection is gone (the broker returns its unacked deliveries)",
                SETTLE_WRITE.as_secs()
            ),
        )),
    }
}

/// Settles one delivery: acks go out in batches per channel (see [`Acks`]), a requeue at once.
struct LapinAcker {
    acker: lapin::Acker,
    tag: u64,
    acks: Arc<Acks>,
    sender: Arc<ChannelAcks>,
}

#[async_trait]
impl Acker for LapinAcker {
    async fn ack(&self) -> Result<(), BrokerError> {
        let sender: Arc<dyn SendAcks> = self.sender.clone();
        self.acks.ack(self.tag, &sender).await
    }
    async fn requeue(&self) -> Result<(), BrokerError> {
        let reject = self.acker.reject(BasicRejectOptions { requeue: true });
        let rejected = write_settlement(&self.sender.0, "basic.reject", reject).await;
        // CORRECTNESS: only once the reject is on the channel may a later `multiple` ack pass
        // this tag (frames of one channel reach the broker in the order they were written). A
        // reject that failed leaves a closed channel, whose acks no longer matter.
        self.acks.rejected(self.tag);
        rejected
    }
}

/// Sends a consuming channel's ack batches.
struct ChannelAcks(Channel);

#[async_trait]
impl SendAcks for ChannelAcks {
    async fn ack(&self, tag: u64, multiple: bool) -> Result<(), BrokerError> {
        let ack = self.0.basic_ack(tag, BasicAckOptions { multiple });
        write_settlement(&self.0, "basic.ack", ack).await
    }
}

#[async_trait]
impl Broker for RabbitBroker {
    async fn publish(&self, target: Target, envelope: Envelope) -> Result<(), BrokerError> {
        match self.start_publish(&target, &envelope, None).await?.await {
            // The kept events' queue was deleted (by hand): declared again, the event goes to it.
            Err(BrokerError::Unroutable(what)) if matches!(target, Target::Event(_)) => {
                tracing::warn!(unroutable = %what, queue = %self.names.events_kept(), "no queue bound to the events exchange; declaring the kept events' queue again");
                self.declare().await?;
                self.start_publish(&target, &envelope, None).await?.await
            }
            published => published,
        }
    }

    async fn send_job(
        &self,
        route: Route,
        job_id: Option<&str>,
        envelope: Envelope,
    ) -> Result<Confirm, BrokerError> {
        self.start_publish(&Target::Job(route), &envelope, job_id)
            .await
    }

    async fn consume(
        &self,
        number: &PhoneNumberId,
        lanes: &[Lane],
        prefetch: u16,
    ) -> Result<Vec<(Lane, Stream<Delivery>)>, BrokerError> {
        let queues = lanes
            .iter()
            .map(|&lane| {
                let origin: Origin<Lane> = Box::new(move |_| lane);
                (self.names.number_queue(number.as_str(), lane), origin)
            })
            .collect();
        let streams = self.consume_queues(queues, prefetch).await?;
        Ok(lanes.iter().copied().zip(streams).collect())
    }

    async fn consume_unrouted(
        &self,
        prefetch: u16,
    ) -> Result<Stream<Delivery<Unrouted>>, BrokerError> {
        let origin: Origin<Unrouted> = Box::new(|key| Unrouted {
            routing_key: key.to_owned(),
        });
        let mut streams = self
            .consume_queues(vec![(self.names.unrouted(), origin)], prefetch)
            .await?;
        Ok(streams.pop().expect("one queue, one stream"))
    }

    async fn consume_intake(&self, prefetch: u16) -> Result<Stream<Delivery<Intake>>, BrokerError> {
        let origin: Origin<Intake> = Box::new(|_| Intake);
        let mut streams = self
            .consume_queues(vec![(self.names.intake_queue(), origin)], prefetch)
            .await?;
        Ok(streams.pop().expect("one queue, one stream"))
    }

    async fn tap(&self, tap: Tap) -> Result<Stream<Tapped>, BrokerError> {
        let channel = self.channel().await?;
        let exchange = match tap {
            Tap::Events => self.names.events_exchange(),
            Tap::Dead => self.names.dead_exchange(),
        };
        let options = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        let queue = channel
            .queue_declare("".into(), options, FieldTable::default())
            .await
            .map_err(|e| BrokerError::op("queue.declare", e))?;
        channel
            .queue_bind(
                queue.name().clone(),
                exchange.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| BrokerError::op("queue.bind", e))?;
        let consumer = channel
            .basic_consume(
                queue.name().clone(),
                "tap".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| BrokerError::op("basic.consume", e))?;
        Ok(consumer
            .map(move |d| {
                // Keep the channel alive as long as the stream.
                let _ = &channel;
                let d = d.map_err(|e| BrokerError::op("tap", e))?;
                Ok(Tapped {
                    routing_key: d.routing_key.as_str().to_owned(),
                    envelope: Envelope {
                        body: d.data.into(),
                        headers: from_properties(&d.properties),
                    },
                })
            })
            .boxed())
    }

    async fn events_unread(&self) -> Result<Option<(u32, u64)>, BrokerError> {
        if !self.keeps_events() {
            return Ok(None);
        }
        let unread = self.message_counts([self.names.events_kept()]).await?;
        Ok(Some((unread[0], self.settings.events_kept)))
    }

    async fn depth(&self, lane: Lane) -> Result<u32, BrokerError> {
        let queues = (self.settings.numbers.iter())
            .map(|number| self.names.number_queue(number.as_str(), lane));
        let counts = self.message_counts(queues).await?;
        Ok(counts.into_iter().fold(0u32, u32::saturating_add))
    }

    async fn stop_consuming(&self) -> Result<(), BrokerError> {
        let mut consumers = self.consumers.lock().await;
        // Channels closed since (a dropped consumer, a lost connection) have nothing to cancel.
        consumers.retain(|(channel, _)| channel.status().connected());
        let mut failed = None;
        for (channel, tag) in consumers.iter() {
            let cancelled = channel
                .basic_cancel(tag.clone(), BasicCancelOptions::default())
                .await;
            // A channel that began closing meanwhile (its stream dropped) has nothing to cancel.
            if let Err(e) = cancelled
                && channel.status().connected()
            {
                failed.get_or_insert(BrokerError::op("basic.cancel", e));
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_tried_in_a_random_order_with_the_one_just_lost_last() {
        let mut firsts = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let order = node_order(3, Some(1));
            assert_eq!(order.len(), 3);
            assert_eq!(order[2], 1, "the node lost is tried last: {order:?}");
            firsts.insert(order[0]);
            let fresh = node_order(3, None);
            let mut sorted = fresh.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, [0, 1, 2], "every node once: {fresh:?}");
        }
        assert_eq!(firsts.len(), 2, "replicas spread over the other nodes");
        assert_eq!(node_order(1, Some(0)), [0], "a single node is tried again");
    }

    #[test]
    fn a_node_is_named_by_its_host_and_port() {
        assert_eq!(host_port("amqp://u:p@rabbit-1:5672/%2f"), "rabbit-1:5672");
        assert_eq!(host_port("amqps://rabbit-2:5671"), "rabbit-2:5671");
    }

    #[test]
    fn credentials_are_redacted() {
        assert_eq!(
            redact("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }
}
