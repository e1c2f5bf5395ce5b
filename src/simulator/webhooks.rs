//! Webhook delivery: updates are scheduled with a delay, batched per POST (grouped by WABA into
//! Meta's `entry[].changes[]` envelope), signed with `X-Hub-Signature-256`, sometimes posted
//! twice, and retried with backoff (bounded) when the receiver does not answer 200.
//!
//! The HTTP handlers call [`Outbox::send_after`], which only pushes onto a channel. One dispatcher
//! task holds the updates until they fall due, gathers due ones into a batch, and hands each
//! closed batch to its own task that waits for a POST slot (`concurrency`), then posts and
//! retries. Without a callback URL nothing is kept or posted: the updates are dropped on the
//! spot, so a scenario without a receiver uses no memory for them.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::Bytes;
use hmac::{Hmac, Mac};
use rand::Rng;
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::audit::Audit;
use super::scenario::WebhookSettings;

/// One `changes[]` element for one WABA.
#[derive(Debug, Clone)]
pub(crate) struct Update {
    /// `entry[].id`.
    pub(crate) waba_id: String,
    /// `changes[].field`: `messages`, `user_preferences`, `message_template_status_update`, …
    pub(crate) field: &'static str,
    /// `changes[].value`.
    pub(crate) value: Value,
}

/// The sending side of the dispatcher.
pub(crate) struct Outbox {
    /// The settings it was started with (read by the status planner).
    pub(crate) settings: WebhookSettings,
    /// `None` when there is no callback URL: updates are dropped at once.
    queue: Option<mpsc::UnboundedSender<(Duration, Update)>>,
}

impl Outbox {
    /// Starts the dispatcher task (stops with `stop`). Without `settings.url` no task is started
    /// and every update is dropped (counted as neither delivered nor duplicated).
    pub(crate) fn start(
        settings: &WebhookSettings,
        audit: Arc<Mutex<Audit>>,
        stop: CancellationToken,
    ) -> Self {
        let queue = settings.url.clone().map(|url| {
            let (tx, rx) = mpsc::unbounded_channel();
            let poster = Poster::new(url, settings, audit.clone(), stop.clone());
            tokio::spawn(dispatch(settings.clone(), rx, poster, audit, stop));
            tx
        });
        Outbox {
            settings: settings.clone(),
            queue,
        }
    }

    /// Posts `update` after `delay` (batched with others that fall due together).
    ///
    /// Never blocks and takes no lock: the handlers call it while holding the world or audit
    /// mutex.
    pub(crate) fn send_after(&self, delay: Duration, update: Update) {
        if let Some(queue) = &self.queue {
            // A closed channel means the dispatcher stopped (shutdown): the update is dropped.
            let _ = queue.send((delay, update));
        }
    }
}

/// `sha256=<hex>`: HMAC-SHA256 of the raw body with the app secret, as Meta signs webhooks.
pub fn sign(app_secret: &str, body: &[u8]) -> String {
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail here.
    let mut mac = Hmac::<Sha256>::new_from_slice(app_secret.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Updates waiting to fall due, earliest first.
#[derive(Default)]
struct Pending {
    heap: BinaryHeap<Reverse<Due>>,
    /// Arrival counter: breaks ties between equal due instants.
    next_seq: u64,
}

struct Due {
    at: Instant,
    seq: u64,
    update: Update,
}

// CORRECTNESS: ordered by (due instant, arrival). Updates due at the same instant leave in the
// order they were scheduled, so only the planner's delays (reordering on purpose) and the
// POSTs in flight at once decide the order a receiver sees.
impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}
impl Eq for Due {}

impl Pending {
    fn push(&mut self, at: Instant, update: Update) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.heap.push(Reverse(Due { at, seq, update }));
    }

    /// When the earliest update falls due.
    fn next_due(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse(d)| d.at)
    }

    /// The earliest update if it is due at `now`, with the instant it fell due.
    fn pop_due(&mut self, now: Instant) -> Option<(Instant, Update)> {
        if self.next_due()? > now {
            return None;
        }
        self.heap.pop().map(|Reverse(d)| (d.at, d.update))
    }
}

/// The batch being filled: closed when full or `wait` after its first update fell due.
struct Batch {
    updates: Vec<Update>,
    max: usize,
    wait: Duration,
    deadline: Option<Instant>,
}

impl Batch {
    fn new(max: usize, wait: Duration) -> Self {
        Batch {
            updates: Vec::new(),
            max: max.max(1),
            wait,
            deadline: None,
        }
    }

    /// Adds an update that fell due at `due`; returns the batch when that fills it.
    fn add(&mut self, due: Instant, update: Update) -> Option<Vec<Update>> {
        if self.updates.is_empty() {
            self.deadline = Some(due + self.wait);
        }
        self.updates.push(update);
        (self.updates.len() >= self.max).then(|| self.take())
    }

    /// The batch, if its wait is over at `now`.
    fn take_if_expired(&mut self, now: Instant) -> Option<Vec<Update>> {
        match self.deadline {
            Some(deadline) if deadline <= now => Some(self.take()),
            _ => None,
        }
    }

    fn take(&mut self) -> Vec<Update> {
        self.deadline = None;
        std::mem::take(&mut self.updates)
    }
}

/// The dispatcher: holds updates until due, batches them and hands batches to the poster.
async fn dispatch(
    settings: WebhookSettings,
    mut incoming: mpsc::UnboundedReceiver<(Duration, Update)>,
    poster: Arc<Poster>,
    audit: Arc<Mutex<Audit>>,
    stop: CancellationToken,
) {
    let mut pending = Pending::default();
    let mut batch = Batch::new(
        settings.batch_max,
        Duration::from_millis(settings.batch_wait_ms),
    );
    let duplicate_share = settings.duplicate_share.clamp(0.0, 1.0);
    loop {
        // Move everything due into batches on every turn, whichever branch woke us: a busy
        // channel must not starve the timers.
        let now = Instant::now();
        while let Some((due, update)) = pending.pop_due(now) {
            if let Some(full) = batch.add(due, update) {
                poster.post(full);
            }
        }
        if let Some(expired) = batch.take_if_expired(now) {
            poster.post(expired);
        }
        let wake = match (pending.next_due(), batch.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            received = incoming.recv() => {
                let Some((delay, update)) = received else { break };
                let now = Instant::now();
                // Decided here, not in `send_after`, because the handlers call that while
                // holding the audit lock.
                let copy_after = (duplicate_share > 0.0 && rand::rng().random_bool(duplicate_share))
                    .then(|| delay + Duration::from_millis(rand::rng().random_range(0..=1000)));
                if let Some(after) = copy_after {
                    pending.push(now + after, update.clone());
                    lock(&audit).webhooks.duplicated += 1;
                }
                pending.push(now + delay, update);
            }
            () = sleep_until(wake), if wake.is_some() => {}
        }
    }
    // Shutdown: post what is already due, drop what is not.
    let now = Instant::now();
    while let Some((due, update)) = pending.pop_due(now) {
        if let Some(full) = batch.add(due, update) {
            poster.post(full);
        }
    }
    let rest = batch.take();
    if !rest.is_empty() {
        poster.post(rest);
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

fn lock(audit: &Mutex<Audit>) -> std::sync::MutexGuard<'_, Audit> {
    // A panic elsewhere while holding the audit must not stop webhook delivery.
    audit
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Meta's envelope for a batch: one `entry` per WABA (in order of first appearance), and within
/// it one change per update, except that consecutive status updates of the same number are
/// merged into one change with several `statuses`, as Meta batches them.
fn envelope(updates: &[Update]) -> Value {
    let mut entries: Vec<(&str, Vec<(&'static str, Value)>)> = Vec::new();
    for update in updates {
        let index = match entries.iter().position(|(waba, _)| *waba == update.waba_id) {
            Some(i) => i,
            None => {
                entries.push((&update.waba_id, Vec::new()));
                entries.len() - 1
            }
        };
        let changes = &mut entries[index].1;
        if let Some((field, last)) = changes.last_mut()
            && let Some(statuses) = mergeable_statuses(update, field, last)
        {
            if let Some(Value::Array(into)) = last.get_mut("statuses") {
                into.extend(statuses.iter().cloned());
            }
            continue;
        }
        changes.push((update.field, update.value.clone()));
    }
    let entry: Vec<Value> = entries
        .into_iter()
        .map(|(waba, changes)| {
            let changes: Vec<Value> = changes
                .into_iter()
                .map(|(field, value)| json!({"value": value, "field": field}))
                .collect();
            json!({"id": waba, "changes": changes})
        })
        .collect();
    json!({"object": "whatsapp_business_account", "entry": entry})
}

/// The statuses of `update` if they can join the previous change (`field`, `last`): both are
/// `messages` changes of the same number carrying only `statuses`.
fn mergeable_statuses<'u>(update: &'u Update, field: &str, last: &Value) -> Option<&'u Vec<Value>> {
    let statuses_only = |v: &Value| {
        v.get("statuses").is_some_and(Value::is_array)
            && v.get("messages").is_none()
            && v.get("errors").is_none()
    };
    let number = |v: &Value| v.pointer("/metadata/phone_number_id").cloned();
    let same = update.field == "messages"
        && field == "messages"
        && statuses_only(&update.value)
        && statuses_only(last)
        && number(&update.value).is_some()
        && number(&update.value) == number(last);
    if same {
        update.value.get("statuses").and_then(Value::as_array)
    } else {
        None
    }
}

/// Posts batches: signs, bounds concurrency, retries with backoff and keeps the audit.
struct Poster {
    client: reqwest::Client,
    url: String,
    app_secret: String,
    slots: Arc<Semaphore>,
    backoff: ExponentialBuilder,
    audit: Arc<Mutex<Audit>>,
    stop: CancellationToken,
}

impl Poster {
    fn new(
        url: String,
        settings: &WebhookSettings,
        audit: Arc<Mutex<Audit>>,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .user_agent("facebookexternalua")
            .build()
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "webhook client with default settings");
                reqwest::Client::new()
            });
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(settings.retry_min_ms))
            .with_max_delay(Duration::from_millis(
                settings.retry_max_ms.max(settings.retry_min_ms),
            ))
            .with_jitter()
            .with_max_times(settings.max_attempts.saturating_sub(1) as usize);
        Arc::new(Poster {
            client,
            url,
            app_secret: settings.app_secret.clone(),
            slots: Arc::new(Semaphore::new(settings.concurrency.max(1))),
            backoff,
            audit,
            stop,
        })
    }

    /// Serialises and signs `updates` now and posts them from a task of their own, so the
    /// dispatcher never waits for the receiver.
    fn post(self: &Arc<Self>, updates: Vec<Update>) {
        let count = updates.len() as u64;
        let body = match serde_json::to_vec(&envelope(&updates)) {
            Ok(body) => Bytes::from(body),
            Err(e) => {
                tracing::warn!(error = %e, "webhook batch cannot be serialised; dropped");
                return;
            }
        };
        // CORRECTNESS: signed over the very bytes sent, once; every retry re-sends them, since
        // any re-serialisation could change the bytes and break the signature.
        let signature = sign(&self.app_secret, &body);
        let poster = Arc::clone(self);
        tokio::spawn(async move {
            // Waiting for a slot is the backpressure: the semaphore is fair, so batches leave in
            // the order they were closed.
            let Ok(_slot) = Arc::clone(&poster.slots).acquire_owned().await else {
                return;
            };
            poster.deliver(body, signature, count).await;
        });
    }

    /// Posts until answered 200 or out of attempts (or stopped while waiting to retry).
    async fn deliver(&self, body: Bytes, signature: String, count: u64) {
        let mut delays = self.backoff.build();
        loop {
            let error = match self.attempt(body.clone(), &signature).await {
                Ok(()) => {
                    let mut audit = lock(&self.audit);
                    audit.webhooks.delivered_posts += 1;
                    audit.webhooks.delivered_updates += count;
                    return;
                }
                Err(error) => error,
            };
            lock(&self.audit).webhooks.failed_attempts += 1;
            let Some(delay) = delays.next() else {
                lock(&self.audit).webhooks.given_up += 1;
                tracing::warn!(error = %error, url = %self.url, updates = count, "webhook POST given up after its last attempt");
                return;
            };
            tracing::debug!(error = %error, retry_in_ms = delay.as_millis() as u64, "webhook POST failed; retrying");
            tokio::select! {
                biased;
                () = self.stop.cancelled() => {
                    lock(&self.audit).webhooks.given_up += 1;
                    tracing::warn!(error = %error, url = %self.url, updates = count, "webhook POST abandoned at shutdown");
                    return;
                }
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One POST; anything but 200 is a failure.
    async fn attempt(&self, body: Bytes, signature: &str) -> Result<(), String> {
        let response = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("X-Hub-Signature-256", signature)
            .body(body)
            .send()
            .await
            .map_err(|e| chain(&e))?;
        let status = response.status();
        // Read the answer so the connection can be reused; its content does not matter.
        let _ = response.bytes().await;
        if status == reqwest::StatusCode::OK {
            Ok(())
        } else {
            Err(format!("receiver answered {status}"))
        }
    }
}

/// An error with its causes (reqwest's own message omits them).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(waba: &str, number: &str, wamid: &str, state: &str) -> Update {
        Update {
            waba_id: waba.into(),
            field: "messages",
            value: json!({
                "messaging_product": "whatsapp",
                "metadata": {"display_phone_number": "15550000000", "phone_number_id": number},
                "statuses": [{"id": wamid, "status": state}],
            }),
        }
    }

    fn inbound(waba: &str, number: &str) -> Update {
        Update {
            waba_id: waba.into(),
            field: "messages",
            value: json!({
                "messaging_product": "whatsapp",
                "metadata": {"display_phone_number": "15550000000", "phone_number_id": number},
                "contacts": [{"profile": {"name": "Ann"}, "wa_id": "1"}],
                "messages": [{"from": "1", "id": "wamid.in", "type": "text", "text": {"body": "hi"}}],
            }),
        }
    }

    fn ids(change: &Value) -> Vec<&str> {
        change["value"]["statuses"]
            .as_array()
            .map(|s| s.iter().filter_map(|s| s["id"].as_str()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn signature_matches_an_independently_computed_vector() {
        // python3 -c "import hmac,hashlib;print(hmac.new(b'secret',b'body',hashlib.sha256).hexdigest())"
        assert_eq!(
            sign("secret", b"body"),
            "sha256=dc46983557fea127b43af721467eb9b3fde2338fe3e14f51952aa8478c13d355"
        );
        assert_ne!(sign("other", b"body"), sign("secret", b"body"));
    }

    #[test]
    fn consecutive_statuses_of_one_number_share_a_change() {
        let body = envelope(&[
            status("W1", "N1", "a", "sent"),
            status("W1", "N1", "b", "sent"),
            status("W1", "N1", "a", "delivered"),
        ]);
        assert_eq!(body["object"], "whatsapp_business_account");
        let changes = body["entry"][0]["changes"].as_array().expect("changes");
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0]["field"], "messages");
        assert_eq!(ids(&changes[0]), ["a", "b", "a"]);
        assert_eq!(changes[0]["value"]["statuses"][2]["status"], "delivered");
    }

    #[test]
    fn one_entry_per_waba_in_order_of_first_appearance() {
        let body = envelope(&[
            status("W2", "N2", "x", "sent"),
            status("W1", "N1", "a", "sent"),
            status("W2", "N2", "y", "sent"),
        ]);
        let entries = body["entry"].as_array().expect("entries");
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0]["id"], "W2");
        assert_eq!(ids(&entries[0]["changes"][0]), ["x", "y"]);
        assert_eq!(entries[1]["id"], "W1");
        assert_eq!(ids(&entries[1]["changes"][0]), ["a"]);
    }

    #[test]
    fn other_numbers_inbound_messages_and_other_fields_stay_separate() {
        let preference = Update {
            waba_id: "W1".into(),
            field: "user_preferences",
            value: json!({"metadata": {"phone_number_id": "N1"}, "statuses": []}),
        };
        let body = envelope(&[
            status("W1", "N1", "a", "sent"),
            status("W1", "N9", "b", "sent"),
            inbound("W1", "N9"),
            status("W1", "N9", "c", "sent"),
            preference,
            status("W1", "N1", "d", "sent"),
        ]);
        let changes = body["entry"][0]["changes"].as_array().expect("changes");
        let fields: Vec<&str> = changes.iter().filter_map(|c| c["field"].as_str()).collect();
        assert_eq!(
            fields,
            [
                "messages",
                "messages",
                "messages",
                "messages",
                "user_preferences",
                "messages"
            ]
        );
        assert_eq!(ids(&changes[0]), ["a"]);
        assert_eq!(ids(&changes[1]), ["b"]);
        assert!(changes[2]["value"].get("statuses").is_none());
        assert_eq!(changes[2]["value"]["messages"][0]["id"], "wamid.in");
        assert_eq!(ids(&changes[3]), ["c"]);
        assert_eq!(ids(&changes[5]), ["d"]);
    }

    #[test]
    fn pending_updates_leave_by_due_time_then_arrival() {
        let t0 = Instant::now();
        let mut pending = Pending::default();
        pending.push(
            t0 + Duration::from_millis(20),
            status("W", "N", "late", "sent"),
        );
        pending.push(
            t0 + Duration::from_millis(10),
            status("W", "N", "first", "sent"),
        );
        pending.push(
            t0 + Duration::from_millis(10),
            status("W", "N", "second", "sent"),
        );
        assert_eq!(pending.next_due(), Some(t0 + Duration::from_millis(10)));
        assert!(pending.pop_due(t0).is_none(), "nothing is due yet");
        let due: Vec<String> =
            std::iter::from_fn(|| pending.pop_due(t0 + Duration::from_millis(15)))
                .map(|(_, u)| {
                    u.value["statuses"][0]["id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned()
                })
                .collect();
        assert_eq!(due, ["first", "second"]);
        assert!(pending.pop_due(t0 + Duration::from_millis(20)).is_some());
        assert!(pending.next_due().is_none());
    }

    #[test]
    fn a_batch_closes_when_full_or_when_its_wait_is_over() {
        let t0 = Instant::now();
        let mut batch = Batch::new(2, Duration::from_millis(50));
        assert!(batch.add(t0, status("W", "N", "a", "sent")).is_none());
        assert_eq!(batch.deadline, Some(t0 + Duration::from_millis(50)));
        let full = batch.add(t0 + Duration::from_millis(5), status("W", "N", "b", "sent"));
        assert_eq!(full.map(|b| b.len()), Some(2));
        assert!(batch.deadline.is_none());

        assert!(
            batch
                .add(
                    t0 + Duration::from_millis(10),
                    status("W", "N", "c", "sent")
                )
                .is_none()
        );
        assert!(
            batch
                .take_if_expired(t0 + Duration::from_millis(59))
                .is_none()
        );
        let expired = batch.take_if_expired(t0 + Duration::from_millis(60));
        assert_eq!(expired.map(|b| b.len()), Some(1));
        assert!(
            batch.take_if_expired(t0 + Duration::from_secs(9)).is_none(),
            "empty batches are not posted"
        );
    }
}
