//! The webhook receiver over real HTTP with a real RabbitMQ: Meta's handshake, signatures checked
//! over the raw bytes (a bad one is refused and nothing reaches the intake), size and type
//! limits, 503 when the broker cannot take the body, and the simulator's own signed webhooks.

mod common;

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use secrecy::SecretString;
use wa_sender::app::HttpServer;
use wa_sender::broker::rabbit::RabbitBroker;
use wa_sender::simulator::{Action, Scenario, Simulator, sign};
use wa_sender::webhook::receiver::{ReceiverSettings, router};

const APP_SECRET: &str = "test-app-secret";
const VERIFY_TOKEN: &str = "test-verify-token";

struct Receiver {
    url: String,
    prefix: String,
    settings: wa_sender::config::Settings,
    broker: Arc<RabbitBroker>,
    stop: tokio_util::sync::CancellationToken,
}

async fn start(test: &str) -> Receiver {
    let prefix = common::unique_prefix(test);
    let settings = common::settings(&prefix, "http://unused");
    let broker = RabbitBroker::connect(settings.runtime().unwrap().rabbit())
        .await
        .unwrap_or_else(|e| panic!("integration tests need RabbitMQ: {e}"));
    let broker = Arc::new(broker);
    let server = HttpServer::bind(
        "127.0.0.1:0",
        router(
            broker.clone(),
            ReceiverSettings {
                verify_token: SecretString::from(VERIFY_TOKEN),
                app_secret: SecretString::from(APP_SECRET),
            },
        ),
    )
    .await
    .unwrap();
    let url = format!("http://{}/webhook", server.addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(server.run_until_stopped(stop.clone()));
    Receiver {
        url,
        prefix,
        settings,
        broker,
        stop,
    }
}

impl Receiver {
    /// Everything in the intake queue, taken off it.
    async fn intake(&self) -> Vec<Vec<u8>> {
        let queue = format!("{}.webhooks.intake", self.prefix);
        let taken = common::take_all(&self.settings.amqp.url, &queue).await;
        taken.into_iter().map(|t| t.body).collect()
    }

    async fn post(
        &self,
        body: &[u8],
        signature: Option<&str>,
        content_type: &str,
    ) -> reqwest::Response {
        let mut request = reqwest::Client::new()
            .post(&self.url)
            .header("content-type", content_type)
            .body(body.to_vec());
        if let Some(signature) = signature {
            request = request.header("x-hub-signature-256", signature);
        }
        request.send().await.unwrap()
    }

    async fn cleanup(self) {
        self.stop.cancel();
        let broker = RabbitBroker::connect(self.settings.runtime().unwrap().rabbit())
            .await
            .unwrap();
        broker.delete_topology().await.unwrap();
        broker.close().await;
    }
}

/// Meta's documented `delivered` example, with escaped unicode: signed as sent, byte for byte.
const DELIVERED: &str = r#"{"object":"whatsapp_business_account","entry":[{"id":"102290129340398","changes":[{"value":{"messaging_product":"whatsapp","metadata":{"display_phone_number":"15550783881","phone_number_id":"106540352242922"},"statuses":[{"id":"wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQUFERjg0NDEzNDdFODU3MUMxMAA=","status":"delivered","timestamp":"1750030080","recipient_id":"16505551234","biz_opaque_callback_data":"job-8c1f \u00e4","pricing":{"billable":true,"pricing_model":"PMP","type":"regular","category":"utility"}}]},"field":"messages"}]}]}"#;

#[tokio::test]
async fn the_handshake_answers_the_challenge_only_with_the_right_token() {
    let r = start("wh-handshake").await;
    let client = reqwest::Client::new();
    let ok = client
        .get(format!(
            "{}?hub.mode=subscribe&hub.verify_token={VERIFY_TOKEN}&hub.challenge=1158201444",
            r.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(ok.text().await.unwrap(), "1158201444");
    let wrong = client
        .get(format!(
            "{}?hub.mode=subscribe&hub.verify_token=guess&hub.challenge=1",
            r.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::FORBIDDEN);
    r.cleanup().await;
}

#[tokio::test]
async fn only_correctly_signed_json_reaches_the_intake_byte_for_byte() {
    let r = start("wh-signed").await;
    let body = DELIVERED.as_bytes();
    let good = sign(APP_SECRET, body);
    let wrong_secret = sign("not-the-secret", body);
    let mut tampered = body.to_vec();
    tampered[10] ^= 1;

    assert_eq!(
        r.post(&tampered, Some(&good), "application/json")
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        r.post(body, Some(&wrong_secret), "application/json")
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        r.post(body, None, "application/json").await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        r.post(body, Some(&good), "text/plain").await.status(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    let huge = vec![b' '; 3 * 1024 * 1024 + 1];
    let huge_sig = sign(APP_SECRET, &huge);
    assert_eq!(
        r.post(&huge, Some(&huge_sig), "application/json")
            .await
            .status(),
        StatusCode::PAYLOAD_TOO_LARGE
    );
    assert!(r.intake().await.is_empty(), "nothing refused was taken");

    let accepted = r
        .post(body, Some(&good), "application/json; charset=utf-8")
        .await;
    assert_eq!(accepted.status(), StatusCode::OK);
    assert_eq!(
        r.intake().await,
        vec![body.to_vec()],
        "the raw body, unchanged"
    );
    r.cleanup().await;
}

#[tokio::test]
async fn a_broker_that_cannot_take_the_body_gets_a_503_so_meta_retries() {
    let r = start("wh-down").await;
    r.broker.close().await;
    let body = DELIVERED.as_bytes();
    let answer = r
        .post(body, Some(&sign(APP_SECRET, body)), "application/json")
        .await;
    assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.headers()["retry-after"], "5");
    r.cleanup().await;
}

#[tokio::test]
async fn the_simulators_signed_webhooks_are_taken() {
    let r = start("wh-sim").await;
    let mut scenario = Scenario::single(common::NUMBER, common::WABA, common::TOKEN);
    scenario.webhooks.url = Some(r.url.clone());
    scenario.webhooks.app_secret = APP_SECRET.into();
    let sim = Simulator::start(scenario, "127.0.0.1:0").await.unwrap();
    sim.act(Action::Inbound {
        from: "16505551234".into(),
        phone_number_id: common::NUMBER.into(),
        text: "STOP".into(),
    })
    .unwrap();
    let mut bodies = Vec::new();
    for _ in 0..100 {
        bodies.extend(r.intake().await);
        if !bodies.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(bodies.len(), 1, "one inbound webhook");
    let value: serde_json::Value = serde_json::from_slice(&bodies[0]).unwrap();
    assert_eq!(
        value["entry"][0]["changes"][0]["value"]["messages"][0]["text"]["body"],
        "STOP"
    );
    assert_eq!(sim.audit().webhooks.delivered_posts, 1);
    sim.stop();
    r.cleanup().await;
}

/// A receiver with `limits`, for the slow-client tests; returns its address and its run.
async fn slow_receiver(
    test: &str,
    limits: wa_sender::server::ServerLimits,
) -> (
    Receiver,
    std::net::SocketAddr,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let receiver = start(test).await;
    let server = HttpServer::bind(
        "127.0.0.1:0",
        router(
            receiver.broker.clone(),
            ReceiverSettings {
                verify_token: SecretString::from(VERIFY_TOKEN),
                app_secret: SecretString::from(APP_SECRET),
            },
        ),
    )
    .await
    .unwrap()
    .with_limits(limits);
    let addr = server.addr().unwrap();
    let run = tokio::spawn(server.run_until_stopped(receiver.stop.clone()));
    (receiver, addr, run)
}

/// Opens a connection and sends a request's headers and half of its body, then nothing.
async fn half_a_request(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = "POST /webhook HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n\
                x-hub-signature-256: sha256=00\r\ncontent-length: 400\r\n\r\n{\"object\":";
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

/// Everything the server sends until it closes the connection (or `wait` passes).
async fn answer(stream: &mut tokio::net::TcpStream, wait: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    tokio::time::timeout(wait, stream.read_to_end(&mut answer))
        .await
        .ok()
        .map(|_| String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::test]
async fn a_client_that_sends_half_a_request_is_answered_408_and_let_go() {
    let limits = wa_sender::server::ServerLimits {
        header_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let (receiver, addr, _run) = slow_receiver("slowbody", limits).await;
    // Half a body: the request's deadline answers it.
    let mut stream = half_a_request(addr).await;
    let answered = answer(&mut stream, Duration::from_secs(20)).await;
    let answered = answered.expect("the server let go of a client that sent half a body");
    assert!(answered.starts_with("HTTP/1.1 408"), "{answered}");
    // Half the headers: the connection is closed.
    {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"POST /webhook HTTP/1.1\r\nhost:")
            .await
            .unwrap();
        let closed = answer(&mut stream, Duration::from_secs(20)).await;
        assert!(
            closed.is_some(),
            "the server let go of a client that sent half its headers"
        );
    }
    // Well-behaved clients are still served.
    let answered = receiver.post(b"{}", None, "application/json").await;
    assert_eq!(answered.status(), StatusCode::UNAUTHORIZED);
    assert!(receiver.intake().await.is_empty(), "nothing unsigned taken");
    receiver.cleanup().await;
}

#[tokio::test]
async fn shutdown_ends_within_the_grace_period_whatever_clients_do() {
    let limits = wa_sender::server::ServerLimits {
        header_timeout: Duration::from_secs(300),
        request_timeout: Duration::from_secs(300),
        shutdown_grace: Duration::from_secs(1),
        ..Default::default()
    };
    let (receiver, addr, run) = slow_receiver("slowstop", limits).await;
    let mut held = vec![half_a_request(addr).await];
    {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"POST /webhook HTTP/1.1\r\nhost:")
            .await
            .unwrap();
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    receiver.stop.cancel();
    // Without the grace period's end the clients would hold it for 300 s.
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the server stopped although clients still held connections")
        .unwrap()
        .unwrap();
    for stream in &mut held {
        assert!(
            answer(stream, Duration::from_secs(10)).await.is_some(),
            "the held connection was closed"
        );
    }
    receiver.cleanup().await;
}

/// The webhook process serves `/healthz` and `/readyz` beside the receiver, as `wa-sender
/// webhook` does: alive at once, ready only once its processor consumes the intake.
#[tokio::test]
async fn the_webhook_process_answers_health_and_readiness_beside_the_receiver() {
    let prefix = common::unique_prefix("wh-health");
    let settings = common::settings(&prefix, "http://unused")
        .runtime()
        .unwrap();
    let broker = Arc::new(RabbitBroker::connect(settings.rabbit()).await.unwrap());
    let store = wa_sender::app::connect_store(&settings).await.unwrap();
    let secrets = ReceiverSettings {
        verify_token: SecretString::from(VERIFY_TOKEN),
        app_secret: SecretString::from(APP_SECRET),
    };
    let webhook = wa_sender::app::WebhookApp::with_parts(
        &settings,
        "127.0.0.1:0",
        secrets,
        broker.clone(),
        store.clone(),
    )
    .await
    .unwrap();
    let base = format!("http://{}", webhook.addr());
    let stop = tokio_util::sync::CancellationToken::new();

    let alive = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(alive.status(), StatusCode::OK);
    assert_eq!(alive.text().await.unwrap(), "ok");
    assert_eq!(
        common::readyz(&base).await,
        Some((
            503,
            serde_json::json!({"ready": false, "broker": "down", "redis": "up", "draining": false})
        )),
        "not ready before the processor consumes"
    );

    let processing = tokio::spawn(webhook.run_until_stopped(stop.clone()));
    common::wait_readyz(&base, Duration::from_secs(10), |status, body| {
        status == 200 && *body == common::all_up()
    })
    .await;
    // The receiver still answers on the same port.
    let body = DELIVERED.as_bytes();
    let taken = reqwest::Client::new()
        .post(format!("{base}/webhook"))
        .header("content-type", "application/json")
        .header("x-hub-signature-256", sign(APP_SECRET, body))
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(taken.status(), StatusCode::OK);

    stop.cancel();
    assert!(processing.await.unwrap().is_ok());
    broker.delete_topology().await.unwrap();
    broker.close().await;
    store.delete_all().await.unwrap();
}
