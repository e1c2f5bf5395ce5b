//! The simulator's webhooks over real HTTP: a small receiver records every POST and checks its
//! signature independently; the tests send messages and act as users and Meta, then look at what
//! arrived. No RabbitMQ or Redis needed.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use wa_sender::simulator::{
    Action, DelayRange, Marketing, Scenario, SimUser, Simulator, WebhookAudit,
};

const NUMBER: &str = "106540352242922";
const WABA: &str = "102290129340398";
const TOKEN: &str = "webhook-test-token";
const SECRET: &str = "webhook-test-app-secret";

/// One POST as the receiver saw it.
#[derive(Debug, Clone)]
struct Post {
    answered: u16,
    signature: Option<String>,
    content_type: Option<String>,
    user_agent: Option<String>,
    body: Bytes,
}

impl Post {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("webhook bodies are JSON")
    }
}

/// One `changes[]` element with its `entry[].id`.
#[derive(Debug, Clone)]
struct Change {
    waba: String,
    field: String,
    value: Value,
}

#[derive(Clone)]
struct Receiver {
    url: String,
    posts: Arc<Mutex<Vec<Post>>>,
    /// POSTs still to answer 500.
    fail_next: Arc<AtomicU32>,
}

async fn record(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let failing = r
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let answer = if failing {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    r.posts.lock().unwrap().push(Post {
        answered: answer.as_u16(),
        signature: header("x-hub-signature-256"),
        content_type: header("content-type"),
        user_agent: header("user-agent"),
        body,
    });
    answer
}

/// A webhook receiver on a free port that answers 500 to its first `fail_first` POSTs.
async fn receiver(fail_first: u32) -> Receiver {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let r = Receiver {
        url: format!("http://{addr}/webhook"),
        posts: Arc::default(),
        fail_next: Arc::new(AtomicU32::new(fail_first)),
    };
    let app = Router::new()
        .route("/webhook", post(record))
        .with_state(r.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    r
}

impl Receiver {
    fn posts(&self) -> Vec<Post> {
        self.posts.lock().unwrap().clone()
    }

    /// Changes of the POSTs answered 200, in order of arrival.
    fn changes(&self) -> Vec<Change> {
        self.posts()
            .iter()
            .filter(|p| p.answered == 200)
            .flat_map(|p| {
                let body = p.json();
                let mut out = Vec::new();
                for entry in body["entry"].as_array().into_iter().flatten() {
                    for change in entry["changes"].as_array().into_iter().flatten() {
                        out.push(Change {
                            waba: entry["id"].as_str().unwrap_or_default().to_owned(),
                            field: change["field"].as_str().unwrap_or_default().to_owned(),
                            value: change["value"].clone(),
                        });
                    }
                }
                out
            })
            .collect()
    }

    /// Every delivered status, in order of arrival.
    fn statuses(&self) -> Vec<Value> {
        self.changes()
            .into_iter()
            .filter(|c| c.field == "messages")
            .flat_map(|c| c.value["statuses"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    fn statuses_of(&self, wamid: &str) -> Vec<Value> {
        self.statuses()
            .into_iter()
            .filter(|s| s["id"] == wamid)
            .collect()
    }

    /// The status names of a message, in order of arrival.
    fn states_of(&self, wamid: &str) -> Vec<String> {
        self.statuses_of(wamid)
            .iter()
            .filter_map(|s| s["status"].as_str().map(str::to_owned))
            .collect()
    }
}

/// Independent check of `X-Hub-Signature-256` (not the simulator's `sign`), in constant time.
fn signed_by(secret: &str, body: &[u8], header: Option<&str>) -> bool {
    let Some(hex_digest) = header.and_then(|h| h.strip_prefix("sha256=")) else {
        return false;
    };
    let Ok(digest) = hex::decode(hex_digest) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    mac.verify_slice(&digest).is_ok()
}

/// Polls `probe` until it gives a value; fails after 10 s saying what was awaited.
async fn eventually<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Sim {
    sim: Simulator,
    hooks: Receiver,
    http: reqwest::Client,
}

/// A simulator posting to a fresh receiver, with statuses 20 ms apart and short retries.
async fn start(fail_first: u32, tweak: impl FnOnce(&mut Scenario)) -> Sim {
    let hooks = receiver(fail_first).await;
    let mut scenario = Scenario::single(NUMBER, WABA, TOKEN);
    let w = &mut scenario.webhooks;
    w.url = Some(hooks.url.clone());
    w.app_secret = SECRET.into();
    w.sent_after = DelayRange::fixed(20);
    w.delivered_after = DelayRange::fixed(20);
    w.read_after = DelayRange::fixed(20);
    w.batch_wait_ms = 10;
    w.retry_min_ms = 20;
    w.retry_max_ms = 100;
    scenario.unknown_users.read_share = 1.0;
    tweak(&mut scenario);
    let sim = Simulator::start(scenario, "127.0.0.1:0").await.unwrap();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    Sim { sim, hooks, http }
}

fn template(to: &str, name: &str, params: &[&str], job: &str) -> Value {
    let parameters: Vec<Value> = params
        .iter()
        .map(|p| json!({"type": "text", "text": p}))
        .collect();
    json!({
        "messaging_product": "whatsapp",
        "to": format!("+{to}"),
        "type": "template",
        "biz_opaque_callback_data": job,
        "template": {
            "name": name,
            "language": {"code": "en_US"},
            "components": [{"type": "body", "parameters": parameters}],
        },
    })
}

fn order_update(to: &str, job: &str) -> Value {
    template(to, "order_update", &["Ann", "A-1"], job)
}

fn spring_sale(to: &str, job: &str) -> Value {
    template(to, "spring_sale", &["Ann"], job)
}

fn text(to: &str, body: &str) -> Value {
    json!({"messaging_product": "whatsapp", "to": format!("+{to}"), "type": "text", "text": {"body": body}})
}

impl Sim {
    async fn send(&self, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/v23.0/{NUMBER}/messages", self.sim.base_url()))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// Sends and expects acceptance; returns the wamid.
    async fn accepted(&self, body: Value) -> String {
        let (status, answer) = self.send(body).await;
        assert_eq!(status, 200, "send refused: {answer}");
        answer["messages"][0]["id"]
            .as_str()
            .expect("a wamid")
            .to_owned()
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.sim.base_url()))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    fn webhook_audit(&self) -> WebhookAudit {
        self.sim.audit().webhooks
    }

    /// Waits until the message's statuses include all of `states`.
    async fn wait_states(&self, wamid: &str, states: &[&str]) -> Vec<Value> {
        eventually(&format!("{states:?} for {wamid}"), || {
            let seen = self.hooks.states_of(wamid);
            states
                .iter()
                .all(|s| seen.iter().any(|x| x == s))
                .then(|| self.hooks.statuses_of(wamid))
        })
        .await
    }
}

fn find<'a>(statuses: &'a [Value], state: &str) -> &'a Value {
    statuses
        .iter()
        .find(|s| s["status"] == state)
        .unwrap_or_else(|| panic!("no {state} status in {statuses:?}"))
}

fn timestamp(status: &Value) -> i64 {
    status["timestamp"]
        .as_str()
        .expect("timestamp is a string")
        .parse()
        .expect("unix seconds")
}

#[tokio::test]
async fn every_post_is_json_signed_with_the_app_secret() {
    let s = start(0, |_| {}).await;
    let wamid = s.accepted(order_update("16505550001", "job-1")).await;
    s.wait_states(&wamid, &["sent", "delivered", "read"]).await;

    let posts = s.hooks.posts();
    assert!(!posts.is_empty());
    for p in &posts {
        assert!(
            signed_by(SECRET, &p.body, p.signature.as_deref()),
            "bad signature {:?} on {}",
            p.signature,
            String::from_utf8_lossy(&p.body)
        );
        assert_eq!(p.content_type.as_deref(), Some("application/json"));
        assert_eq!(p.user_agent.as_deref(), Some("facebookexternalua"));
        assert_eq!(p.json()["object"], "whatsapp_business_account");
    }
    // The check itself catches a wrong secret and a changed body.
    let p = &posts[0];
    assert!(!signed_by(
        "another-secret",
        &p.body,
        p.signature.as_deref()
    ));
    let mut changed = p.body.to_vec();
    changed.push(b' ');
    assert!(!signed_by(SECRET, &changed, p.signature.as_deref()));
    s.sim.stop();
}

#[tokio::test]
async fn a_template_goes_sent_delivered_read_with_pricing_and_callback_data() {
    let s = start(0, |scenario| {
        // One POST at a time, so arrival order is posting order.
        scenario.webhooks.concurrency = 1;
        scenario.users = vec![SimUser::new("16505550001"), SimUser::new("16505550002")];
    })
    .await;
    s.sim
        .act(Action::Inbound {
            from: "16505550002".into(),
            phone_number_id: NUMBER.into(),
            text: "hi".into(),
        })
        .unwrap();
    let closed = s.accepted(order_update("16505550001", "job-1")).await;
    let open = s.accepted(order_update("16505550002", "job-2")).await;

    let statuses = s.wait_states(&closed, &["sent", "delivered", "read"]).await;
    assert_eq!(s.hooks.states_of(&closed), ["sent", "delivered", "read"]);
    for st in &statuses {
        assert_eq!(st["biz_opaque_callback_data"], "job-1");
        assert_eq!(st["recipient_id"], "16505550001");
    }
    let pricing = &find(&statuses, "sent")["pricing"];
    assert_eq!(pricing["pricing_model"], "PMP");
    assert_eq!(pricing["category"], "utility");
    assert_eq!(pricing["type"], "regular");

    let statuses = s.wait_states(&open, &["sent", "delivered", "read"]).await;
    assert_eq!(find(&statuses, "sent")["biz_opaque_callback_data"], "job-2");
    let pricing = &find(&statuses, "sent")["pricing"];
    assert_eq!(pricing["category"], "utility");
    assert_eq!(
        pricing["type"], "free_customer_service",
        "the inbound message opened the window"
    );
    s.sim.stop();
}

#[tokio::test]
async fn asynchronous_failures_carry_meta_error_codes() {
    let s = start(0, |scenario| {
        let mut unreachable = SimUser::new("16505550013");
        unreachable.reachable = false;
        let mut capped = SimUser::new("16505550014");
        capped.marketing_cap_per_day = Some(1);
        scenario.users = vec![
            SimUser::new("16505550011"),
            SimUser::new("16505550012"),
            unreachable,
            capped,
        ];
    })
    .await;
    s.sim
        .act(Action::MarketingPreference {
            wa_id: "16505550012".into(),
            phone_number_id: NUMBER.into(),
            value: Marketing::Stopped,
        })
        .unwrap();

    let mut cases = vec![
        (s.accepted(text("16505550011", "hello")).await, 131047),
        (
            s.accepted(spring_sale("16505550012", "job-stopped")).await,
            131050,
        ),
        (
            s.accepted(order_update("16505550013", "job-unreachable"))
                .await,
            131026,
        ),
    ];
    let first_sale = s.accepted(spring_sale("16505550014", "job-sale-1")).await;
    cases.push((
        s.accepted(spring_sale("16505550014", "job-sale-2")).await,
        131049,
    ));

    for (wamid, code) in &cases {
        let statuses = s.wait_states(wamid, &["failed"]).await;
        let failed = find(&statuses, "failed");
        assert_eq!(failed["errors"][0]["code"], *code, "{failed}");
        assert!(failed["errors"][0]["title"].is_string());
        assert!(failed.get("pricing").is_none(), "failures are not billed");
        assert_eq!(s.hooks.states_of(wamid), ["failed"]);
    }
    let statuses = s.wait_states(&first_sale, &["sent", "delivered"]).await;
    assert!(
        statuses.iter().all(|st| st["status"] != "failed"),
        "the first marketing message is within the cap"
    );
    s.sim.stop();
}

#[tokio::test]
async fn posts_answered_500_are_retried_with_the_same_bytes_and_signature() {
    let s = start(2, |_| {}).await;
    let wamid = s.accepted(order_update("16505550001", "job-1")).await;
    s.wait_states(&wamid, &["sent", "delivered", "read"]).await;

    let posts = s.hooks.posts();
    let failed: Vec<&Post> = posts.iter().filter(|p| p.answered == 500).collect();
    assert_eq!(failed.len(), 2);
    for f in failed {
        assert!(
            posts
                .iter()
                .any(|p| p.answered == 200 && p.body == f.body && p.signature == f.signature),
            "a failed POST was not re-sent identically: {}",
            String::from_utf8_lossy(&f.body)
        );
    }
    let audit = eventually("the audit to count 3 delivered updates", || {
        let a = s.webhook_audit();
        (a.delivered_updates >= 3).then_some(a)
    })
    .await;
    assert!(audit.failed_attempts >= 2, "{audit:?}");
    assert_eq!(audit.given_up, 0, "{audit:?}");
    s.sim.stop();
}

#[tokio::test]
async fn duplicate_share_one_posts_every_status_twice() {
    let s = start(0, |scenario| scenario.webhooks.duplicate_share = 1.0).await;
    let wamid = s.accepted(order_update("16505550001", "job-1")).await;
    eventually("every status twice", || {
        let states = s.hooks.states_of(&wamid);
        ["sent", "delivered", "read"]
            .iter()
            .all(|want| states.iter().filter(|s| s == want).count() >= 2)
            .then_some(())
    })
    .await;
    let audit = eventually("3 duplicates counted and delivered", || {
        let a = s.webhook_audit();
        (a.delivered_updates >= 6).then_some(a)
    })
    .await;
    assert_eq!(audit.duplicated, 3, "{audit:?}");
    assert_eq!(
        s.hooks.statuses_of(&wamid).len(),
        6,
        "each status exactly twice"
    );
    s.sim.stop();
}

#[tokio::test]
async fn reordered_messages_post_read_before_delivered_with_true_timestamps() {
    let s = start(0, |scenario| {
        scenario.webhooks.reorder_share = 1.0;
        scenario.webhooks.concurrency = 1;
        // More than a second between delivery and reading, so their timestamps differ.
        scenario.webhooks.read_after = DelayRange::fixed(1_100);
    })
    .await;
    let wamid = s.accepted(order_update("16505550001", "job-1")).await;
    let statuses = s.wait_states(&wamid, &["sent", "delivered", "read"]).await;
    assert_eq!(s.hooks.states_of(&wamid), ["sent", "read", "delivered"]);
    assert!(timestamp(find(&statuses, "sent")) <= timestamp(find(&statuses, "delivered")));
    assert!(
        timestamp(find(&statuses, "delivered")) < timestamp(find(&statuses, "read")),
        "timestamps tell the true order: {statuses:?}"
    );
    s.sim.stop();
}

#[tokio::test]
async fn statuses_are_batched_into_fewer_posts_with_merged_arrays() {
    let s = start(0, |scenario| {
        scenario.webhooks.batch_max = 50;
        scenario.webhooks.batch_wait_ms = 200;
    })
    .await;
    let sends = (0..20).map(|i| {
        s.accepted(order_update(
            &format!("165055510{i:02}"),
            &format!("job-{i}"),
        ))
    });
    let wamids = futures::future::join_all(sends).await;
    eventually("60 statuses", || {
        (s.hooks.statuses().len() >= 60).then_some(())
    })
    .await;

    let statuses = s.hooks.statuses();
    assert_eq!(statuses.len(), 60, "nothing lost, nothing doubled");
    for wamid in &wamids {
        assert_eq!(s.hooks.statuses_of(wamid).len(), 3);
    }
    let posts = s.hooks.posts();
    assert!(
        posts.len() < statuses.len(),
        "{} POSTs for {} statuses",
        posts.len(),
        statuses.len()
    );
    let changes = s.hooks.changes();
    assert!(
        changes.len() < statuses.len(),
        "statuses are merged into shared changes"
    );
    assert!(
        changes
            .iter()
            .any(|c| c.value["statuses"].as_array().is_some_and(|a| a.len() > 1))
    );
    for c in &changes {
        assert_eq!(c.waba, WABA);
        assert_eq!(c.value["metadata"]["phone_number_id"], NUMBER);
    }
    let audit = eventually("the audit to count 60 delivered updates", || {
        let a = s.webhook_audit();
        (a.delivered_updates >= 60).then_some(a)
    })
    .await;
    assert_eq!(audit.delivered_updates, 60);
    assert_eq!(audit.delivered_posts, posts.len() as u64);
    s.sim.stop();
}

#[tokio::test]
async fn actions_emit_webhooks_and_the_upgrade_pauses_then_raises_throughput() {
    let s = start(0, |_| {}).await;
    let change = |field: &'static str| {
        let hooks = s.hooks.clone();
        move || {
            hooks
                .changes()
                .into_iter()
                .find(|c| c.field == field && c.value.get("statuses").is_none())
        }
    };

    s.sim
        .act(Action::Inbound {
            from: "16505550031".into(),
            phone_number_id: NUMBER.into(),
            text: "STOP".into(),
        })
        .unwrap();
    let inbound = eventually("an inbound message", change("messages")).await;
    assert_eq!(inbound.waba, WABA);
    assert_eq!(inbound.value["messages"][0]["from"], "16505550031");
    assert_eq!(inbound.value["messages"][0]["text"]["body"], "STOP");
    assert_eq!(inbound.value["contacts"][0]["wa_id"], "16505550031");
    assert_eq!(inbound.value["metadata"]["phone_number_id"], NUMBER);

    s.sim
        .act(Action::MarketingPreference {
            wa_id: "16505550031".into(),
            phone_number_id: NUMBER.into(),
            value: Marketing::Stopped,
        })
        .unwrap();
    let preference = eventually("user_preferences", change("user_preferences")).await;
    assert_eq!(
        preference.value["user_preferences"][0]["wa_id"],
        "16505550031"
    );
    assert_eq!(preference.value["user_preferences"][0]["value"], "stop");
    assert_eq!(
        preference.value["user_preferences"][0]["category"],
        "marketing_messages"
    );

    s.sim
        .act(Action::TemplateStatus {
            waba_id: None,
            name: "otp_code".into(),
            language: "en_US".into(),
            status: "PAUSED".into(),
        })
        .unwrap();
    let paused = eventually(
        "message_template_status_update",
        change("message_template_status_update"),
    )
    .await;
    assert_eq!(paused.waba, WABA);
    assert_eq!(paused.value["event"], "PAUSED");
    assert_eq!(paused.value["message_template_name"], "otp_code");

    s.sim
        .act(Action::ThroughputUpgrade {
            phone_number_id: NUMBER.into(),
            maintenance_ms: 1_000,
        })
        .unwrap();
    let (status, answer) = s
        .send(order_update("16505550001", "job-during-upgrade"))
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_i64()),
        (500, Some(131057)),
        "{answer}"
    );
    let upgrade = eventually(
        "phone_number_quality_update",
        change("phone_number_quality_update"),
    )
    .await;
    assert_eq!(upgrade.waba, WABA);
    assert_eq!(upgrade.value["event"], "THROUGHPUT_UPGRADE");

    let (status, number) = s.get(&format!("/v23.0/{NUMBER}?fields=throughput")).await;
    assert_eq!(status, 200, "{number}");
    assert_eq!(number["throughput"]["level"], "HIGH");
    s.accepted(order_update("16505550001", "job-after-upgrade"))
        .await;
    s.sim.stop();
}
