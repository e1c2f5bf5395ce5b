//! A broker that goes away mid-stream loses no webhook. The receiver and the processor reach
//! RabbitMQ through a TCP proxy that the test cuts (every connection dropped, new ones refused)
//! and restores, which is what they see of a broker restart, without restarting the RabbitMQ
//! the other tests share. Meta's side is played by a sender that, like Meta, retries every
//! answer but 200: it sees 503 while the broker is gone, and every status ends as an event.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{NUMBER, WABA, all_up, readyz, serve_health, spawn_app, wait_readyz};
use futures::StreamExt;
use secrecy::SecretString;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use wa_sender::app::{WebhookApp, WorkerApp};
use wa_sender::broker::rabbit::RabbitBroker;
use wa_sender::config::Runtime;
use wa_sender::simulator::sign;
use wa_sender::store::redis::RedisStore;
use wa_sender::webhook::receiver::ReceiverSettings;

const APP_SECRET: &str = "restart-secret";
const STATUSES: usize = 120;

/// A TCP proxy to RabbitMQ that can be cut and restored.
struct Proxy {
    addr: SocketAddr,
    down: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    async fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let down = Arc::new(AtomicBool::new(false));
        let links = Arc::new(Mutex::new(Vec::new()));
        let (d, l) = (down.clone(), links.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if d.load(Ordering::SeqCst) {
                    continue; // dropped: connection refused, as by a stopped broker
                }
                let link = tokio::spawn(async move {
                    if let Ok(mut broker) = TcpStream::connect("127.0.0.1:5672").await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
                    }
                });
                l.lock().unwrap().push(link);
            }
        });
        Proxy { addr, down, links }
    }

    /// The broker "stops": every open connection is dropped, new ones are refused.
    fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    /// The broker is back.
    fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

/// The app's settings, with RabbitMQ reached through `proxy`.
fn through(app: &common::TestApp, proxy: &Proxy) -> Runtime {
    let mut through_proxy = app.runtime();
    through_proxy.amqp.urls = vec![format!("amqp://guest:guest@{}/%2f", proxy.addr)];
    through_proxy
}

/// The webhook process (receiver and processor) over `broker` and `store`, on a free port,
/// holding 16 intake bodies at a time.
async fn webhook_app(
    settings: &Runtime,
    broker: Arc<RabbitBroker>,
    store: Arc<RedisStore>,
) -> WebhookApp {
    let mut settings = settings.clone();
    settings.webhook.prefetch = 16;
    let settings = &settings;
    let secrets = ReceiverSettings {
        verify_token: SecretString::from("v"),
        app_secret: SecretString::from(APP_SECRET),
    };
    WebhookApp::with_parts(settings, "127.0.0.1:0", secrets, broker, store)
        .await
        .unwrap()
}

fn status_body(i: usize) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"object": "whatsapp_business_account", "entry": [{"id": WABA, "changes": [{
        "field": "messages",
        "value": {"messaging_product": "whatsapp",
                  "metadata": {"display_phone_number": "15550783881", "phone_number_id": NUMBER},
                  "statuses": [{"id": format!("wamid.restart{i:04}"), "status": "delivered",
                                "timestamp": "1750030080", "recipient_id": "16505551234"}]}}]}]}),
    )
    .unwrap()
}

#[tokio::test]
async fn a_broker_restart_mid_stream_loses_no_webhook() {
    let mut app = spawn_app("restart", |_, _| {}).await;
    let proxy = Proxy::start().await;
    let through_proxy = through(&app, &proxy);
    let (broker, store) = wa_sender::app::connect(&through_proxy).await.unwrap();
    let webhook = webhook_app(&through_proxy, broker.clone(), store).await;
    let url = format!("http://{}/webhook", webhook.addr());
    let stop = CancellationToken::new();
    let processing = tokio::spawn(webhook.run_until_stopped(stop.clone()));

    // Meta: one status after another, each retried until answered 200.
    let client = reqwest::Client::new();
    let mut refused = 0;
    for i in 0..STATUSES {
        if i == STATUSES / 3 {
            proxy.cut();
            let proxy_down = Duration::from_secs(2);
            let down = proxy.down.clone();
            tokio::spawn(async move {
                tokio::time::sleep(proxy_down).await;
                down.store(false, Ordering::SeqCst);
            });
        }
        let body = status_body(i);
        loop {
            let answer = client
                .post(&url)
                .header("content-type", "application/json")
                .header("x-hub-signature-256", sign(APP_SECRET, &body))
                .body(body.clone())
                .send()
                .await
                .unwrap();
            if answer.status() == 200 {
                break;
            }
            assert_eq!(
                answer.status(),
                503,
                "only 'try again' while the broker is gone"
            );
            refused += 1;
            assert!(refused < 100, "the receiver never recovered from the cut");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    proxy.restore();
    assert!(refused > 0, "the cut was seen as 503s");

    // Every status became an event (read through a connection that was never cut).
    let mut delivered = BTreeSet::new();
    while delivered.len() < STATUSES {
        let event = tokio::time::timeout(Duration::from_secs(20), app.events.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {STATUSES} statuses became events",
                    delivered.len()
                )
            })
            .unwrap()
            .unwrap();
        if event.event == "message.delivered" {
            delivered.insert(event.wamid.unwrap());
        }
    }
    assert_eq!(delivered.len(), STATUSES);
    stop.cancel();
    assert!(processing.await.unwrap().is_ok());
    broker.close().await;
    app.cleanup().await;
}

/// The webhook process's `/readyz` follows its broker: ready while its processor consumes the
/// intake, 503 naming the broker while the broker is cut, ready again once it consumes again;
/// `/healthz` says it is alive throughout.
#[tokio::test]
async fn the_webhook_process_is_not_ready_while_its_broker_is_cut() {
    let app = spawn_app("hready", |_, _| {}).await;
    let proxy = Proxy::start().await;
    let through_proxy = through(&app, &proxy);
    let (broker, store) = wa_sender::app::connect(&through_proxy).await.unwrap();
    let webhook = webhook_app(&through_proxy, broker.clone(), store).await;
    let base = format!("http://{}", webhook.addr());
    let stop = CancellationToken::new();
    let processing = tokio::spawn(webhook.run_until_stopped(stop.clone()));
    let alive = || async {
        let answer = reqwest::get(format!("{base}/healthz")).await.unwrap();
        (answer.status().as_u16(), answer.text().await.unwrap())
    };

    wait_readyz(&base, Duration::from_secs(10), |status, body| {
        status == 200 && *body == all_up()
    })
    .await;
    proxy.cut();
    let cut = wait_readyz(&base, Duration::from_secs(10), |status, _| status == 503).await;
    assert_eq!(
        cut,
        json!({"ready": false, "broker": "down", "redis": "up", "draining": false})
    );
    assert_eq!(
        alive().await,
        (200, "ok".to_owned()),
        "alive while not ready"
    );
    proxy.restore();
    wait_readyz(&base, Duration::from_secs(30), |status, body| {
        status == 200 && *body == all_up()
    })
    .await;

    stop.cancel();
    assert!(processing.await.unwrap().is_ok());
    broker.close().await;
    app.cleanup().await;
}

/// The worker lives through its broker going away: it keeps running without a supervisor,
/// consumes again once the broker is back, and every job is sent exactly once. Its `/readyz`
/// says it is not ready, for want of the broker, for as long as it cannot consume.
#[tokio::test]
async fn a_worker_survives_a_broker_restart() {
    use common::text_job;
    use wa_sender::job::Lane;

    const JOBS: usize = 40;
    let mut app = spawn_app("wrestart", |_, _| {}).await;
    let proxy = Proxy::start().await;
    let through_proxy = through(&app, &proxy);
    let (broker, store) = wa_sender::app::connect(&through_proxy).await.unwrap();
    let worker = WorkerApp::with_parts(&through_proxy, broker.clone(), store).unwrap();
    let shutdown = CancellationToken::new();
    let health_stop = CancellationToken::new();
    let probe = serve_health(worker.health(), health_stop.clone()).await;
    let worker = tokio::spawn(worker.run_until_stopped(shutdown.clone()));

    let ids: Vec<String> = (0..JOBS).map(|i| format!("survive-{i:02}")).collect();
    let enqueue = async |app: &common::TestApp, ids: &[String]| {
        for id in ids {
            let job = text_job(id);
            app.user_wrote(&job).await;
            app.enqueue_json(Lane::Bulk, &job).await;
        }
    };
    // Half before the broker goes away; the worker sends some of them.
    enqueue(&app, &ids[..JOBS / 2]).await;
    app.wait_job_event(&ids[0], "message.accepted").await;
    assert_eq!(
        readyz(&probe).await,
        Some((200, all_up())),
        "ready while consuming"
    );
    proxy.cut();
    let cut = wait_readyz(&probe, Duration::from_secs(10), |status, _| status == 503).await;
    assert_eq!(
        cut,
        json!({"ready": false, "broker": "down", "redis": "up", "draining": false}),
        "not ready, and the broker named as the part that is down"
    );
    // The rest while the worker cannot reach it (published by the producer's own connection).
    enqueue(&app, &ids[JOBS / 2..]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !worker.is_finished(),
        "the worker exited when the broker went away"
    );
    assert_eq!(
        readyz(&probe).await.map(|(status, _)| status),
        Some(503),
        "still not ready after failed attempts to consume again"
    );
    proxy.restore();
    wait_readyz(&probe, Duration::from_secs(60), |status, body| {
        status == 200 && *body == all_up()
    })
    .await;

    for id in &ids {
        app.wait_event(Duration::from_secs(60), |e| {
            e.job_id.as_deref() == Some(id.as_str()) && e.event == "message.accepted"
        })
        .await;
    }
    let audit = app.simulator.audit();
    for id in &ids {
        assert_eq!(audit.times_sent(id), 1, "job {id} sent once");
    }
    // Deliveries returned by the cut come back and are settled too (a redelivered job whose
    // claim the cut left behind waits out the claim lease): nothing may be in flight when the
    // drain's count is checked.
    app.wait_jobs_settled(Duration::from_secs(60)).await;
    shutdown.cancel();
    let drained = worker.await.unwrap().expect("the worker drains");
    assert_eq!(drained.abandoned, 0);
    let (status, body) = readyz(&probe).await.expect("the probe still answers");
    assert_eq!(
        (status, &body["ready"], &body["draining"]),
        (503, &json!(false), &json!(true)),
        "a worker that has drained is not ready: {body}"
    );
    health_stop.cancel();
    broker.close().await;
    app.cleanup().await;
}

/// A worker started before its broker waits for it instead of exiting.
#[tokio::test]
async fn a_worker_started_before_its_broker_waits_for_it() {
    let app = spawn_app("wwait", |_, _| {}).await;
    let proxy = Proxy::start().await;
    proxy.cut();
    let through_proxy = through(&app, &proxy);
    let shutdown = CancellationToken::new();
    let connecting = {
        let (settings, shutdown) = (through_proxy.clone(), shutdown.clone());
        tokio::spawn(async move { wa_sender::app::connect_waiting(&settings, &shutdown).await })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !connecting.is_finished(),
        "gave up while the broker was down"
    );
    proxy.restore();
    let (broker, _store) = tokio::time::timeout(Duration::from_secs(30), connecting)
        .await
        .expect("connected once the broker was up")
        .unwrap()
        .expect("connected");
    broker.close().await;

    // Asked to stop while still waiting, it stops.
    proxy.cut();
    let connecting = {
        let (settings, shutdown) = (through_proxy.clone(), shutdown.clone());
        tokio::spawn(async move { wa_sender::app::connect_waiting(&settings, &shutdown).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(5), connecting)
        .await
        .expect("stopped at once")
        .unwrap();
    assert!(stopped.is_err());
    app.cleanup().await;
}
